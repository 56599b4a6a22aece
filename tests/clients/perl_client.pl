#!/usr/bin/perl
# A real Perl Gearman::Client (libgearman-client-perl) driven by tests/interop.rs.
#
#   perl perl_client.pl PORT fg FUNC PRIO PAYLOAD [UNIQ]
#       do_task with on_status/on_data/on_warning/on_fail; prints a line per callback and
#       {"ev":"result","data":..} (data null when the task failed)
#   perl perl_client.pl PORT bg FUNC PRIO PAYLOAD [UNIQ]
#       dispatch_background -> {"ev":"queued","handle":..}
#   perl perl_client.pl PORT status HANDLE
#       get_status -> {"ev":"status","known":..,"running":..,"num":..,"den":..}
# PRIO is high, normal or low.
use strict;
use warnings;
use Gearman::Client;
use JSON::PP;

$| = 1;
my $json = JSON::PP->new->canonical;
sub out { print $json->encode($_[0]), "\n"; }

my ($port, $mode, @args) = @ARGV;
die "usage: perl_client.pl PORT fg|bg|status ...\n" unless defined $mode;
my $client = Gearman::Client->new(job_servers => ["127.0.0.1:$port"]);

if ($mode eq "fg" || $mode eq "bg") {
    my ($func, $prio, $payload, $uniq) = @args;
    my %opts = (priority => $prio, timeout => 30);
    $opts{uniq} = $uniq if defined $uniq;
    if ($mode eq "bg") {
        my $handle = $client->dispatch_background($func, \$payload, \%opts);
        out({ev => "queued", handle => $handle});
        exit(defined $handle ? 0 : 1);
    }
    $opts{on_status} = sub { out({ev => "status", num => $_[0] + 0, den => $_[1] + 0}); };
    $opts{on_data} = sub { out({ev => "data", data => ${ $_[0] }}); };
    $opts{on_warning} = sub { out({ev => "warning", data => $_[0]}); };
    $opts{on_fail} = sub { out({ev => "fail"}); };
    my $res = $client->do_task($func, \$payload, \%opts);
    out({ev => "result", data => (defined $res ? $$res : undef)});
    exit(defined $res ? 0 : 1);
}
if ($mode eq "status") {
    my $st = $client->get_status($args[0]);
    die "no status answer\n" unless $st;
    out({ev => "status", known => $st->known ? JSON::PP::true : JSON::PP::false,
         running => $st->running ? JSON::PP::true : JSON::PP::false,
         num => $st->progress ? $st->progress->[0] + 0 : undef,
         den => $st->progress ? $st->progress->[1] + 0 : undef});
    exit 0;
}
die "unknown mode $mode\n";
