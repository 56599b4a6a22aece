#!/usr/bin/env python3
"""Real Python `gear` (OpenStack Zuul's Gearman library) client and worker, driven by
tests/interop.rs. Prints one JSON object per line on stdout, flushed at once.

  py_gear.py PORT client fg FUNC PRIO PAYLOAD [UNIQUE]
      foreground job -> {"ev":"result","handle":..,"data":[chunks..],"failure":..,
                         "exception":..,"warning":..,"num":..,"den":..}
      (data holds every WORK_DATA/WORK_WARNING chunk and the WORK_COMPLETE data, in order)
  py_gear.py PORT client bg FUNC PRIO PAYLOAD [UNIQUE]      -> {"ev":"queued","handle":..}
  py_gear.py PORT client exc FUNC PAYLOAD EXCEPTIONS(0|1)
      foreground job; with 1 the client first sets OPTION_REQ "exceptions"; prints the result
  py_gear.py PORT client status FUNC PAYLOAD
      background job, then GET_STATUS until the server says it is running with a status
      -> {"ev":"status",..}; then GET_STATUS for a handle the server never issued
      -> {"ev":"unknown",..}
  py_gear.py PORT worker COUNT FUNC=BEHAVIOUR...
      works COUNT jobs (0 = until killed; a worker that gets no job for 60 s exits);
      behaviours: echo, reverse, chatty (data "d1", warning "w1", status 1/4, data "d2",
      status 4/4, complete "done:<payload>"), fail, throw (exception "boom:<payload>"),
      hold:FILE (status 1/4, wait for FILE, complete "released:<payload>"), sleep:MS
PRIO is high, normal or low.
With GEAR_SSL_KEY, GEAR_SSL_CERT and GEAR_SSL_CA set, it connects over TLS with that client
certificate (gear's own ssl_key/ssl_cert/ssl_ca arguments).
"""
import hashlib
import json
import os
import sys
import threading
import time

import gear

PRIO = {"high": gear.PRECEDENCE_HIGH, "normal": gear.PRECEDENCE_NORMAL, "low": gear.PRECEDENCE_LOW}


def out(**o):
    sys.stdout.write(json.dumps(o) + "\n")
    sys.stdout.flush()


def text(b):
    if b is None:
        return None
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)


def connect(cls, port, name):
    c = cls(name)
    ssl = [os.environ.get("GEAR_SSL_" + k) for k in ("KEY", "CERT", "CA")]
    if all(ssl):
        c.addServer("127.0.0.1", port, ssl_key=ssl[0], ssl_cert=ssl[1], ssl_ca=ssl[2])
    else:
        c.addServer("127.0.0.1", port)
    c.waitForServer(timeout=10)
    return c


def wait_for(pred, what, timeout=30.0):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            sys.stderr.write("timed out waiting for %s\n" % what)
            os._exit(4)
        time.sleep(0.005)


def report(job):
    out(ev="result", handle=text(job.handle), data=[text(d) for d in job.data],
        failure=job.failure, exception=text(job.exception), warning=job.warning,
        num=text(job.numerator), den=text(job.denominator))


def client(port, mode, args):
    c = connect(gear.Client, port, "interop-client")
    if mode in ("fg", "bg"):
        func, prio, payload = args[0], args[1], args[2]
        unique = args[3] if len(args) > 3 else None
        job = gear.Job(func.encode(), payload.encode(), unique=unique)
        c.submitJob(job, background=(mode == "bg"), precedence=PRIO[prio])
        if mode == "bg":
            out(ev="queued", handle=text(job.handle))
        else:
            wait_for(lambda: job.complete, "the job to complete")
            report(job)
    elif mode == "exc":
        func, payload, exc = args[0], args[1], args[2] == "1"
        if exc and not c.setOption("exceptions"):
            sys.stderr.write("server refused OPTION_REQ exceptions\n")
            os._exit(5)
        job = gear.Job(func.encode(), payload.encode())
        c.submitJob(job)
        wait_for(lambda: job.complete, "the job to complete")
        report(job)
    elif mode == "status":
        func, payload = args[0], args[1]
        job = gear.Job(func.encode(), payload.encode())
        c.submitJob(job, background=True)
        conn = job.connection

        def ask(j):
            j.known = None
            c.sendPacket(gear.Packet(gear.constants.REQ, gear.constants.GET_STATUS, j.handle), conn)
            wait_for(lambda: j.known is not None, "STATUS_RES")

        deadline = time.time() + 20
        while True:
            ask(job)
            if job.running and job.numerator not in (None, b"0", b""):
                break
            if time.time() > deadline:
                break
            time.sleep(0.02)
        out(ev="status", handle=text(job.handle), known=job.known, running=job.running,
            num=text(job.numerator), den=text(job.denominator))
        # gear matches STATUS_RES to jobs by handle, so register a job object for a handle the
        # server never issued before asking about it.
        ghost = gear.Job(func.encode(), b"")
        ghost.handle = b"H:no-such-node:424242"
        conn.related_jobs[ghost.handle] = ghost
        ask(ghost)
        out(ev="unknown", handle=text(ghost.handle), known=ghost.known, running=ghost.running,
            num=text(ghost.numerator), den=text(ghost.denominator))
    else:
        sys.stderr.write("unknown client mode %s\n" % mode)
        os._exit(2)
    c.shutdown()


def watchdog(last, idle):
    """Exits the process when no job started for `idle` seconds (an orphaned worker ends)."""
    def run():
        while True:
            time.sleep(1)
            if time.time() - last[0] > idle:
                sys.stderr.write("idle for %d s, giving up\n" % idle)
                os._exit(3)
    threading.Thread(target=run, daemon=True).start()


def worker(port, count, specs):
    last = [time.time()]
    watchdog(last, 60)
    w = connect(gear.Worker, port, "interop-py-worker-%d" % os.getpid())
    behaviours = {}
    for spec in specs:
        func, behaviour = spec.split("=", 1)
        behaviours[func.encode()] = behaviour
        w.registerFunction(func)
    jobs = 0
    while count == 0 or jobs < count:
        job = w.getJob()
        last[0] = time.time()
        payload = job.arguments
        o = dict(ev="job", worker="python", pid=os.getpid(), func=text(job.name),
                 handle=text(job.handle), unique=text(job.unique), size=len(payload),
                 sha=hashlib.sha256(payload).hexdigest())
        if len(payload) < 4096:
            o["workload"] = text(payload)
        behaviour = behaviours[job.name.encode() if isinstance(job.name, str) else job.name]
        arg = None
        if ":" in behaviour:
            behaviour, arg = behaviour.split(":", 1)
        if behaviour != "hold":
            out(**o)
        if behaviour == "echo":
            job.sendWorkComplete(payload)
        elif behaviour == "reverse":
            job.sendWorkComplete(payload[::-1])
        elif behaviour == "chatty":
            job.sendWorkData(b"d1")
            job.sendWorkWarning(b"w1")
            job.sendWorkStatus(1, 4)
            job.sendWorkData(b"d2")
            job.sendWorkStatus(4, 4)
            job.sendWorkComplete(b"done:" + payload)
        elif behaviour == "fail":
            job.sendWorkFail()
        elif behaviour == "throw":
            job.sendWorkException(b"boom:" + payload)
        elif behaviour == "hold":
            job.sendWorkStatus(1, 4)
            out(**o)
            deadline = time.time() + 30
            while not os.path.exists(arg) and time.time() < deadline:
                time.sleep(0.01)
            job.sendWorkComplete(b"released:" + payload)
        elif behaviour == "sleep":
            time.sleep(int(arg) / 1000.0)
            job.sendWorkComplete(b"r:" + payload)
        else:
            sys.stderr.write("unknown behaviour %s\n" % behaviour)
            os._exit(2)
        jobs += 1
    out(ev="exit", jobs=jobs)
    w.shutdown()


def main():
    port, role = int(sys.argv[1]), sys.argv[2]
    if role == "client":
        client(port, sys.argv[3], sys.argv[4:])
    elif role == "worker":
        worker(port, int(sys.argv[3]), sys.argv[4:])
    else:
        sys.stderr.write(__doc__)
        os._exit(2)


if __name__ == "__main__":
    main()
