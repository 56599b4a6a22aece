<?php
// A real PHP GearmanWorker (pecl gearman on libgearman) driven by tests/interop.rs.
//
//   php php_worker.php PORT COUNT FUNC[@TIMEOUT]=BEHAVIOUR [FUNC[@TIMEOUT]=BEHAVIOUR ...]
//
// With @TIMEOUT the function is registered with addFunction's timeout argument (libgearman sends
// CAN_DO_TIMEOUT with that number).
// Registers every FUNC and works COUNT jobs (0 = until killed or 60 s idle), then exits 0.
// Prints one JSON object per line on stdout, flushed at once:
//   {"ev":"job","func":..,"handle":..,"unique":..,"size":..,"sha":..,"workload":..}  when a job
//   starts (workload only when shorter than 4 KiB), {"ev":"exit","jobs":N} at the end.
// Behaviours:
//   echo            return the workload
//   reverse         return the workload reversed (byte-wise; binary safe)
//   chatty          WORK_DATA "d1", WORK_WARNING "w1", WORK_STATUS 1/4, WORK_DATA "d2",
//                   WORK_STATUS 4/4, then complete with "done:<workload>"
//   fail            WORK_FAIL
//   throw           WORK_EXCEPTION "boom:<workload>"
//   hold:FILE       WORK_STATUS 1/4, print the job line, wait (max 30 s) until FILE exists,
//                   then complete with "released:<workload>"
//   hang            print the job line and sleep (the test kills this worker mid-job)
//   sleep:MS        sleep MS milliseconds, then complete with "r:<workload>"

function out(array $o): void {
    echo json_encode($o, JSON_UNESCAPED_SLASHES | JSON_INVALID_UTF8_SUBSTITUTE), "\n";
    flush();
}

function job_line(GearmanJob $job): void {
    $w = $job->workload();
    $o = ["ev" => "job", "worker" => "php", "pid" => getmypid(), "func" => $job->functionName(),
          "handle" => $job->handle(), "unique" => $job->unique(), "size" => strlen($w),
          "sha" => hash("sha256", $w)];
    if (strlen($w) < 4096) {
        $o["workload"] = $w;
    }
    out($o);
}

if ($argc < 4) {
    fwrite(STDERR, "usage: php_worker.php PORT COUNT FUNC=BEHAVIOUR...\n");
    exit(2);
}
$port = (int)$argv[1];
$count = (int)$argv[2];

$worker = new GearmanWorker();
$worker->addServer("127.0.0.1", $port);
// Return from work() now and then so the idle deadline below is checked.
$worker->setTimeout(1000);

for ($i = 3; $i < $argc; $i++) {
    [$func, $behaviour] = explode("=", $argv[$i], 2);
    $timeout = 0;
    if (strpos($func, "@") !== false) {
        [$func, $timeout] = explode("@", $func, 2);
    }
    $worker->addFunction($func, function (GearmanJob $job) use ($behaviour) {
        $w = $job->workload();
        $arg = null;
        if (strpos($behaviour, ":") !== false) {
            [$behaviour, $arg] = explode(":", $behaviour, 2);
        }
        switch ($behaviour) {
            case "echo":
                job_line($job);
                return $w;
            case "reverse":
                job_line($job);
                return strrev($w);
            case "chatty":
                job_line($job);
                $job->sendData("d1");
                $job->sendWarning("w1");
                $job->sendStatus(1, 4);
                $job->sendData("d2");
                $job->sendStatus(4, 4);
                return "done:" . $w;
            case "fail":
                job_line($job);
                $job->sendFail();
                return null;
            case "throw":
                job_line($job);
                $job->sendException("boom:" . $w);
                return null;
            case "hold":
                $job->sendStatus(1, 4);
                job_line($job);
                $deadline = microtime(true) + 30;
                while (!file_exists($arg) && microtime(true) < $deadline) {
                    usleep(10000);
                }
                return "released:" . $w;
            case "hang":
                job_line($job);
                sleep(60);
                return "too late";
            case "sleep":
                job_line($job);
                usleep(((int)$arg) * 1000);
                return "r:" . $w;
            default:
                fwrite(STDERR, "unknown behaviour $behaviour\n");
                exit(2);
        }
    }, null, (int)$timeout);
}

$jobs = 0;
$idle_deadline = microtime(true) + 60;
while ($count == 0 || $jobs < $count) {
    if (@$worker->work()) {
        $jobs++;
        $idle_deadline = microtime(true) + 60;
        continue;
    }
    $rc = $worker->returnCode();
    if ($rc == GEARMAN_TIMEOUT || $rc == GEARMAN_IO_WAIT || $rc == GEARMAN_NO_JOBS) {
        if (microtime(true) > $idle_deadline) {
            fwrite(STDERR, "idle for 60 s, giving up\n");
            exit(3);
        }
        continue;
    }
    if ($rc == GEARMAN_WORK_FAIL || $rc == GEARMAN_WORK_EXCEPTION || $rc == GEARMAN_SUCCESS) {
        // The job ran and ended in failure/exception on purpose.
        $jobs++;
        continue;
    }
    fwrite(STDERR, "work() failed: rc=$rc " . $worker->error() . "\n");
    exit(1);
}
out(["ev" => "exit", "jobs" => $jobs]);
