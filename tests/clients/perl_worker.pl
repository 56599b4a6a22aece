#!/usr/bin/perl
# A real Perl Gearman::Worker (libgearman-client-perl, a pure-Perl implementation that uses
# GRAB_JOB/JOB_ASSIGN) driven by tests/interop.rs.
#
#   perl perl_worker.pl PORT COUNT FUNC=BEHAVIOUR [FUNC=BEHAVIOUR ...]
#
# Works COUNT jobs (0 = until killed or 60 s idle). Prints one JSON object per line on stdout:
#   {"ev":"job","worker":"perl","func":..,"handle":..,"size":..,"sha":..,"workload":..} per job,
#   {"ev":"exit","jobs":N} at the end.
# Behaviours: echo, reverse, status (WORK_STATUS 1/4 then 4/4, complete "done:<workload>"),
#   sleep:MS (complete "r:<workload>" after MS ms).
use strict;
use warnings;
use Gearman::Worker;
use JSON::PP;
use Digest::SHA qw(sha256_hex);
use Time::HiRes qw(usleep time);

$| = 1;
my $json = JSON::PP->new->canonical;
sub out { print $json->encode($_[0]), "\n"; }

my ($port, $count, @specs) = @ARGV;
die "usage: perl_worker.pl PORT COUNT FUNC=BEHAVIOUR...\n" unless defined $count && @specs;

my $worker = Gearman::Worker->new(job_servers => ["127.0.0.1:$port"]);
my $jobs = 0;
my $last = time;

for my $spec (@specs) {
    my ($func, $behaviour) = split /=/, $spec, 2;
    my $arg;
    ($behaviour, $arg) = split /:/, $behaviour, 2 if $behaviour =~ /:/;
    $worker->register_function($func => sub {
        my $job = shift;
        my $w = $job->arg;
        my %o = (ev => "job", worker => "perl", pid => $$, func => $func, handle => $job->handle,
                 size => length($w), sha => sha256_hex($w));
        $o{workload} = $w if length($w) < 4096;
        out(\%o);
        $jobs++;
        $last = time;
        if ($behaviour eq "echo") { return $w; }
        if ($behaviour eq "reverse") { return scalar reverse $w; }
        if ($behaviour eq "status") {
            $job->set_status(1, 4);
            $job->set_status(4, 4);
            return "done:$w";
        }
        if ($behaviour eq "sleep") { usleep($arg * 1000); return "r:$w"; }
        die "unknown behaviour $behaviour\n";
    });
}

$worker->work(stop_if => sub {
    return 1 if $count > 0 && $jobs >= $count;
    if (time - $last > 60) { print STDERR "idle for 60 s, giving up\n"; exit 3; }
    return 0;
});
out({ev => "exit", jobs => $jobs});
