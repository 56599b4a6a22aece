<?php
// A real PHP GearmanClient (pecl gearman on libgearman) driven by tests/interop.rs.
// Prints one JSON object per line on stdout, flushed at once. Modes:
//
//   bg PORT FUNC PRIO PAYLOAD [UNIQUE]
//       doHighBackground/doBackground/doLowBackground (PRIO high|normal|low)
//       -> {"ev":"queued","handle":..,"rc":..}
//   do PORT FUNC PRIO PAYLOAD [UNIQUE]
//       doHigh/doNormal/doLow -> {"ev":"result","data":..,"rc":..}
//   tasks PORT FUNC EXCEPTIONS(0|1) UNIQUE PAYLOAD...
//       one foreground addTask per PAYLOAD (UNIQUE "" = none), runTasks(), with every callback
//       set; each callback prints {"ev":"created|data|warning|status|complete|fail|exception",..}
//       and ends with {"ev":"done","rc":..}. EXCEPTIONS=1 asks the server for WORK_EXCEPTION
//       (OPTION_REQ exceptions) and sets the exception callback; 0 does neither.
//   status PORT HANDLE
//       jobStatus -> {"ev":"status","known":..,"running":..,"num":..,"den":..}
//   ustatus PORT UNIQUE
//       jobStatusByUniqueKey (GET_STATUS_UNIQUE) -> the same fields
//   file PORT FUNC INFILE OUTFILE
//       doNormal with INFILE's bytes; writes the result to OUTFILE
//       -> {"ev":"result","rc":..,"size":..,"sha":..,"sent_size":..,"sent_sha":..}

function out(array $o): void {
    echo json_encode($o, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
    flush();
}

function client(int $port, bool $exceptions = false): GearmanClient {
    $c = new GearmanClient();
    // The third argument decides whether pecl-gearman sends OPTION_REQ "exceptions".
    if (!$c->addServer("127.0.0.1", $port, $exceptions)) {
        fwrite(STDERR, "addServer failed: " . $c->error() . "\n");
        exit(1);
    }
    $c->setTimeout(30000);
    return $c;
}

$mode = $argv[1] ?? "";
$port = (int)($argv[2] ?? 0);

switch ($mode) {
    case "bg":
        [, , , $func, $prio, $payload] = $argv;
        $unique = $argv[6] ?? null;
        $c = client($port);
        $m = ["high" => "doHighBackground", "normal" => "doBackground", "low" => "doLowBackground"][$prio];
        $handle = $c->$m($func, $payload, $unique);
        out(["ev" => "queued", "handle" => $handle, "rc" => $c->returnCode()]);
        exit($c->returnCode() == GEARMAN_SUCCESS ? 0 : 1);

    case "do":
        [, , , $func, $prio, $payload] = $argv;
        $unique = $argv[6] ?? null;
        $c = client($port);
        $m = ["high" => "doHigh", "normal" => "doNormal", "low" => "doLow"][$prio];
        $data = $c->$m($func, $payload, $unique);
        out(["ev" => "result", "data" => $data, "rc" => $c->returnCode()]);
        exit($c->returnCode() == GEARMAN_SUCCESS ? 0 : 1);

    case "tasks":
        $func = $argv[3];
        $exceptions = $argv[4] === "1";
        $unique = $argv[5] === "" ? null : $argv[5];
        $c = client($port, $exceptions);
        $ev = function (string $name) {
            return function (GearmanTask $t) use ($name) {
                $o = ["ev" => $name, "handle" => $t->jobHandle(), "unique" => $t->unique()];
                if ($name === "status") {
                    $o["num"] = $t->taskNumerator();
                    $o["den"] = $t->taskDenominator();
                } elseif ($name !== "created" && $name !== "fail") {
                    $o["data"] = $t->data();
                }
                out($o);
            };
        };
        $c->setCreatedCallback($ev("created"));
        $c->setDataCallback($ev("data"));
        $c->setWarningCallback($ev("warning"));
        $c->setStatusCallback($ev("status"));
        $c->setCompleteCallback($ev("complete"));
        $c->setFailCallback($ev("fail"));
        if ($exceptions) {
            // pecl-gearman sends OPTION_REQ "exceptions" as soon as an exception callback is set.
            $c->setExceptionCallback($ev("exception"));
        }
        for ($i = 6; $i < $argc; $i++) {
            $c->addTask($func, $argv[$i], null, $unique);
        }
        $ok = $c->runTasks();
        out(["ev" => "done", "ok" => $ok, "rc" => $c->returnCode(), "error" => $c->error()]);
        exit(0);

    case "status":
        $c = client($port);
        [$known, $running, $num, $den] = $c->jobStatus($argv[3]);
        out(["ev" => "status", "known" => $known, "running" => $running, "num" => $num, "den" => $den,
             "rc" => $c->returnCode()]);
        exit(0);

    case "ustatus":
        $c = client($port);
        [$known, $running, $num, $den] = $c->jobStatusByUniqueKey($argv[3]);
        out(["ev" => "status", "known" => $known, "running" => $running, "num" => $num, "den" => $den,
             "rc" => $c->returnCode()]);
        exit(0);

    case "file":
        [, , , $func, $infile, $outfile] = $argv;
        $payload = file_get_contents($infile);
        $c = client($port);
        $data = $c->doNormal($func, $payload);
        file_put_contents($outfile, $data);
        out(["ev" => "result", "rc" => $c->returnCode(), "size" => strlen($data), "sha" => hash("sha256", $data),
             "sent_size" => strlen($payload), "sent_sha" => hash("sha256", $payload)]);
        exit($c->returnCode() == GEARMAN_SUCCESS ? 0 : 1);

    default:
        fwrite(STDERR, "unknown mode '$mode'\n");
        exit(2);
}
