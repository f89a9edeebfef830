"""A pool of worker processes in which a crash, a hang or a memory blow-up costs one task, not the run.

Native decoders (JPEG 2000, JPEG-LS, zlib, libpng, libtiff) can crash or loop on hostile bytes. Each task runs
in a child interpreter with an address-space limit (where /proc tells what the child already holds); the
parent waits on the children's sockets with a deadline: a socket that closes means the child died, reported as
``decoder-crash``, and a child that overruns is killed and reported as ``decode-timeout``; either way a fresh
child takes its place.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait

from gpucnr.errors import GpucnrError
from gpucnr.sources.outcomes import CODES

__all__ = ["IsolatedPool", "Part", "Streamed", "TaskFailure", "allow_memory", "receive", "send"]

#: bytes of a streamed result's items per message (a slab of a volume's slices, as sent: compressed)
_PART_BYTES = 8 * 2**20
#: bytes of parts of later tasks the driver keeps while it stores an earlier task's (`IsolatedPool.imap`)
_PART_BUDGET = 64 * 2**20
#: a bytes object of a result at least this long travels beside the pickle, not inside it (see `send`)
_OUT_OF_BAND = 2**15
#: replies of a batch are held in the child, to be written together, while they are shorter than this
_COALESCE = 2**16
#: a batch's output that its task module holds back (`_child`) is written once it reaches this many bytes or
#: tasks, and at the batch's end: a shard of 512x512 images (~5 MiB) goes in one write
_HOLD_BYTES = 8 * 2**20
_HOLD_TASKS = 256
#: the reply of a task that ran out of its memory (`_run_task`, `_packed`)
_OUT_OF_MEMORY = ("skip", "out-of-memory", "decoding exceeded the per-file memory limit")
#: glibc malloc settings of a child (unless the caller's environment sets them): blocks below 16 MiB (an image, its
#: compressed chunk) come from the heap and are reused, file after file, not mmapped fresh and given back each time:
#: a fresh 512 KB buffer cost ~230 page faults per file, ~0.4 ms of CPU here (issue 17's finding, met again in issue
#: 18: glibc's own threshold starts at 128 KiB and rises only after a larger block is freed, so whether a worker
#: paid it depended on what it happened to read first); up to 64 MiB of free heap is kept rather than trimmed.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20)}
#: ...and one BLAS / OpenMP thread: no task multiplies matrices, and NumPy's import started a pool of OpenBLAS
#: threads per child, ~0.08 s of CPU each time a child starts (issue 18)
_CHILD_ENV = {**_MALLOC_ENV, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is bytes and len(obj) >= _OUT_OF_BAND:
            return bytes, (pickle.PickleBuffer(obj),)  # NB: out of band (protocol 5), rebuilt as bytes on receipt
        return NotImplemented


def send(conn: Connection, message) -> None:
    """Worker -> driver: `message` pickled, its large bytes objects (compressed image chunks) written after the
    pickle, straight to the socket. `multiprocessing.connection.Connection.recv` cost ~0.3 ms of the driver's CPU per
    280 KB chunk here (reads in pieces through a BytesIO), reading it into a buffer of its size ~0.03 ms (issue 18)."""
    _write(conn, _pack(message))


def _pack(message) -> list:
    """`send`'s bytes of `message`: the framed pickle (one `send_bytes` message), then its out-of-band buffers."""
    buffers: list = []
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffers.append).dump(message)
    views = [b.raw() for b in buffers]
    head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    body = head + out.getbuffer()
    # NB: `Connection.send_bytes`'s framing: the length first (-1 then 8 bytes beyond 2 GiB)
    size = struct.pack("!i", len(body)) if len(body) <= 0x7FFFFFFF else struct.pack("!iQ", -1, len(body))
    return [size + body, *views]


def _write(conn: Connection, parts: list) -> None:
    fd = conn.fileno()
    for view in parts:
        view = memoryview(view).cast("B")
        while view.nbytes:
            view = view[os.write(fd, view):]


def receive(conn: Connection):
    """Driver side of `send`; EOFError when the worker died before the whole message came."""
    return _receive(conn)[0]


def _receive(conn: Connection) -> tuple:
    """(`receive`'s message, its size in bytes as sent)."""
    data = conn.recv_bytes()
    (count,) = struct.unpack_from("<I", data)
    sizes = struct.unpack_from(f"<{count}Q", data, 4)
    buffers = []
    fd = conn.fileno()
    for size in sizes:
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = os.readv(fd, [view[got:]])
            if n == 0:
                raise EOFError("the worker's message ended early")
            got += n
        buffers.append(buf)
    return pickle.loads(memoryview(data)[4 + 8 * count:], buffers=buffers), len(data) + sum(sizes)


class Streamed:
    """A task's result sent to the driver in parts: the list ``head[key]`` goes a few items at a time (about
    8 MiB per message, by `sizeof`), then the rest of `head` (see `IsolatedPool.imap` for what the driver
    gets). A worker never pickles a whole volume at once. `prepare`, if given, turns each item into what is sent
    just before it goes (e.g. its pixels into compressed chunks), so that only one part of prepared items exists
    at a time."""

    __slots__ = ("head", "key", "prepare", "sizeof")

    def __init__(self, head: dict, key: str, sizeof: Callable[[object], int],
                 prepare: Callable[[object], object] | None = None):
        self.head, self.key, self.sizeof, self.prepare = head, key, sizeof, prepare

    def send(self, conn) -> None:
        items, part, size = self.head.pop(self.key), [], 0
        while items:
            # NB: each item leaves the list as it is sent: the worker drops what the driver already has
            item = items.pop(0)
            if self.prepare is not None:
                item = self.prepare(item)
            part.append(item)
            size += self.sizeof(item)
            if size >= _PART_BYTES:
                send(conn, ("part", part))
                part, size = [], 0
        if part:
            send(conn, ("part", part))
        send(conn, ("ok", ("streamed", self.key, self.head)))


class Part:
    """Items of a `Streamed` result as `IsolatedPool.imap` yields them with ``parts=True`` (`nbytes`: their size
    as sent)."""

    __slots__ = ("items", "nbytes")

    def __init__(self, items: list, nbytes: int):
        self.items, self.nbytes = items, nbytes

    def __repr__(self):
        return f"Part({len(self.items)} item(s), {self.nbytes} bytes)"


class TaskFailure:
    """What a task produced instead of a result: a skip code and a reason (no value read from the input)."""

    __slots__ = ("code", "reason")

    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason

    def __repr__(self):
        return f"TaskFailure({self.code!r}, {self.reason!r})"


#: (address space after the imports, the hard limit, the default soft limit) in a child with a memory limit
_LIMITS: tuple[int, int, int] | None = None


def allow_memory(mb: float) -> None:
    """Let the current task use up to `mb` MiB beyond the imports (at most the pool's `memory_mb`); the child
    returns to the pool's `task_memory_mb` after the task. A no-op outside a limited child."""
    if _LIMITS is None:
        return
    import resource

    base, hard, _ = _LIMITS
    resource.setrlimit(resource.RLIMIT_AS, (min(hard, base + int(mb * 2**20)), hard))


def _child(conn, target: str, memory_mb: int | None, task_memory_mb: int | None = None) -> None:
    """Child main loop: receive (function args), run, send ("ok", value) or ("skip", code, reason)."""
    import warnings

    # NB: this runs as __main__; tasks see the limits through the module they import
    me = importlib.import_module("gpucnr.sources.workers")
    warnings.simplefilter("ignore")  # NB: readers' warnings can quote header values; stderr is not for them
    base = _vm_bytes() if memory_mb else None
    if base is not None:
        import resource

        # NB: relative to what the interpreter and its imports already reserve, so the limit bounds the task.
        importlib.import_module(target.partition(":")[0])
        base = _vm_bytes()
        hard = base + memory_mb * 2**20
        soft = base + min(memory_mb, task_memory_mb or memory_mb) * 2**20
        me._LIMITS = (base, hard, soft)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    # NB: a task module may hold back part of its results' output (ingest's spool writes: `shardfiles.spool`) to
    # write it in one go: `held_bytes()` says how much it holds, `flush()` writes it; replies whose data is held
    # are packed only after the flush, in task order
    held_bytes, flush = getattr(module, "held_bytes", None), getattr(module, "flush", None)
    if held_bytes is None or flush is None:
        held_bytes = flush = None  # NB: both or neither: what is held must be written
    me.send(conn, "ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        # NB: a list is several tasks in one message (`IsolatedPool.imap`'s `batch`): small replies (header records)
        # are packed as each task ends and written together, one wake-up of the driver for the lot; a large one (an
        # image's chunks) is written at once: a socket holds ~200 KB, so the child would otherwise wait, idle,
        # until the driver had read and stored the whole batch. A task whose result is streamed writes the replies
        # before it first: the order on the socket is the tasks' order.
        replies: list = []
        waiting: list = []  # NB: results of tasks whose data the module holds: packed after its flush
        for args in (message if isinstance(message, list) else [message]):
            reply = _run_task(me, func, args, conn, replies, waiting, flush)
            if reply is None:
                continue
            held = held_bytes() if held_bytes is not None else 0
            if held or waiting:
                waiting.append(reply)
                if held < _HOLD_BYTES and len(waiting) < _HOLD_TASKS:
                    continue
                _release(me, flush, waiting, replies)
            else:
                replies += _packed(me, reply)
            if sum(memoryview(r).nbytes for r in replies) >= _COALESCE:
                me._write(conn, replies)
                replies.clear()
        if waiting:
            _release(me, flush, waiting, replies)
        if replies:
            me._write(conn, replies)


def _release(me, flush, waiting: list, replies: list) -> None:
    """Have the task module write what it holds, then pack the `waiting` replies after `replies`."""
    flush()
    for reply in waiting:
        replies += _packed(me, reply)
    waiting.clear()


def _packed(me, reply: tuple) -> list:
    """`reply` packed for the socket; one that cannot be (pickling it ran out of the task's memory) becomes the
    failure of its task, never of the child."""
    try:
        return me._pack(reply)
    except MemoryError:
        return me._pack(_OUT_OF_MEMORY)
    except Exception as e:  # noqa: BLE001 - as a failure inside the task: its type only, never its text
        return me._pack(("skip", "decode-error", f"the reader failed ({type(e).__name__} while sending)"))


def _run_task(me, func, args, conn, replies: list, waiting: list, flush) -> tuple | None:
    """One task in the child: its reply ("ok", value) or ("skip", code, reason), to be packed; None when its result
    was streamed (sent already, after the `replies` packed and the `waiting` ones flushed and packed before it)."""
    try:
        try:
            result = func(*args)
        finally:
            if me._LIMITS is not None:
                import resource

                # NB: a task's allowance ends with it
                resource.setrlimit(resource.RLIMIT_AS, (me._LIMITS[2], me._LIMITS[1]))
        if isinstance(result, me.Streamed):  # NB: the class tasks import, not this __main__'s
            if waiting:
                _release(me, flush, waiting, replies)
            if replies:
                me._write(conn, replies)
                replies.clear()
            result.send(conn)
            return None
        return ("ok", result)
    except MemoryError:
        return _OUT_OF_MEMORY
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - every failure of one file is reported, never raised in the parent
        # NB: BaseException, not Exception: Rust decoders (pylibjpeg-rle via pyo3) raise PanicException,
        # which derives from BaseException, on malformed data; it is a decode error of this file, not a crash.
        code = getattr(e, "code", None)
        reason = getattr(e, "reason", None)
        if code not in CODES or not isinstance(reason, str):  # NB: only our own Skip carries its text out
            # NB: exception texts of readers can quote header values; only the type and place go out.
            frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            where = f" in {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
            code, reason = "decode-error", f"the reader failed ({type(e).__name__}{where})"
        return ("skip", code, reason)


def _vm_bytes() -> int | None:
    """This process's address space in bytes, or None where /proc does not say (no limit is set there)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class IsolatedPool:
    """Runs ``module:function`` over tasks in `workers` child processes (each holds at most two tasks: the one it
    works on and the next).

    Parameters
    ----------
    target : str
        ``"package.module:function"``, importable in a fresh interpreter; called as ``function(*task)``.
    workers : int
    timeout : float
        Seconds one task may take before its process is killed (``decode-timeout``).
    memory_mb : int or None
        Address space a task may add to what the child holds after importing `target` (``out-of-memory``), at
        most: a task asks for it with `allow_memory` (a volume, by its declared size).
    task_memory_mb : int or None
        What a task may add without asking (default `memory_mb`).
    """

    def __init__(self, target: str, *, workers: int, timeout: float, memory_mb: int | None = None,
                 task_memory_mb: int | None = None):
        self.target, self.workers, self.timeout, self.memory_mb = target, max(1, workers), timeout, memory_mb
        self.task_memory_mb = task_memory_mb
        self._slots: list[dict] = []
        self._starting: list[dict] = []

    def start(self) -> IsolatedPool:
        """Start the worker processes now, without waiting for them: their interpreters start up while the caller
        does other work (ingest walks its folders); the first `imap` waits for them."""
        missing = self.workers - len(self._slots) - len(self._starting)
        self._starting += [self._start() for _ in range(max(0, missing))]
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _start(self) -> dict:
        # NB: a fresh interpreter (not multiprocessing's spawn, which re-imports the caller's __main__); the
        # child's stderr is discarded: native decoders and readers may print header values there.
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-m", "gpucnr.sources.workers", str(theirs.fileno()), self.target,
                                 str(self.memory_mb or 0), str(self.task_memory_mb or 0)],
                                env={**_CHILD_ENV, **os.environ},
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                # NB: a process group of its own: Ctrl-C in the terminal reaches the driver alone,
                                # which stops the children (a child killed by it would read as decoder-crash)
                                process_group=0)
        theirs.close()
        return {"proc": proc, "conn": Connection(ours.detach()), "queue": deque(), "deadline": None, "parts": []}

    def _ready(self, slot: dict) -> dict:
        """Wait for a started child's handshake; a child that cannot even start is an error of the install."""
        try:
            ready = slot["conn"].poll(120) and receive(slot["conn"]) == "ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop(slot)
            raise GpucnrError(f"a worker process could not start (exit code {slot['proc'].returncode}); check that "
                              f"`{sys.executable} -c 'import {self.target.partition(':')[0]}'` works")
        return slot

    @staticmethod
    def _stop(slot: dict) -> None:
        # NB: a child holds no state worth a graceful exit; killing it saves its interpreter shutdown.
        slot["proc"].kill()
        slot["proc"].wait()
        slot["conn"].close()

    def close(self) -> None:
        for slot in self._slots + self._starting:
            self._stop(slot)
        self._slots, self._starting = [], []

    def imap(self, tasks: Iterable[tuple], *, window: int | None = None, costs: Iterable[int] | None = None,
             budget: int | None = None, on_done: Callable[[], None] | None = None, parts: bool = False,
             part_budget: int | None = None, batch: int = 1, batchable: Iterable[bool] | None = None) -> Iterator:
        """Results in task order: each the function's value or a `TaskFailure`.

        Each child holds up to two messages (the next one is queued while it works, so it never waits for the
        driver); the one it is working on has the deadline. A message is one task, or up to `batch` consecutive tasks
        sent together (those `batchable` marks with a true value, all by default when `batch` > 1; tasks marked
        with different values, e.g. the shards their files fill, never share a message), whose replies come back
        together: one round trip, not one per task (issue 18). When a child dies or overruns its deadline while
        working on a message of several tasks, no task of it is blamed: those not answered yet are sent again, each
        alone, so that the one that kills a child alone is its ``decoder-crash`` (or ``decode-timeout``), and the
        others are decoded. At most `window` tasks (default (2 x `batch` + 2) per worker) are dispatched beyond
        the oldest unfinished one, and, given `costs` (e.g. bytes per task) and a `budget`, no task is dispatched
        while the unfinished ones already cost `budget` (one always may, alone), so the driver's memory stays
        bounded whatever a slow file does.

        A task that returns a `Streamed` result sends it in parts. Without `parts` its value is gathered whole
        (``head`` with its list filled in). With `parts`, its items come as they arrive, as `Part` objects, in task
        order before its value (``head`` with its list empty): the caller stores them at once, and a task whose
        worker dies midway ends with a `TaskFailure` after some parts (the caller undoes them). Parts of tasks
        after the one being consumed wait here up to `part_budget` bytes (default 64 MiB); beyond it their
        workers are not read (they block on their sockets, their deadlines paused), so the driver's memory does
        not grow with the size of a volume. `peak_part_bytes` tells the most parts held at once. Tasks whose
        results are streamed should not be `batchable`.
        """
        batch = max(1, batch)
        window = window or (2 * batch + 2) * self.workers
        part_budget = _PART_BUDGET if part_budget is None else part_budget
        cost_of = None if costs is None else iter(costs)
        flags = None if batchable is None else iter(batchable)
        cost: dict[int, int] = {}
        # NB: with which dispatched tasks one may share a message: those of an equal `batchable` value (None: none)
        group_of: dict[int, object] = {}
        it = enumerate(tasks)
        pending: dict[int, object] = {}
        streams: dict[int, deque] = {}  # NB: parts received and not yet yielded, by task (parts=True)
        streamed: set[int] = set()  # NB: tasks some of whose parts were received: never sent to another child
        retry: deque = deque()  # NB: tasks queued behind one that killed its child: sent again elsewhere
        solo: set[int] = set()  # NB: tasks of a message whose child died or overran: each sent alone now
        next_out = submitted = held_bytes = 0
        self.peak_part_bytes = 0
        exhausted = False

        def drop(i: int) -> None:
            nonlocal held_bytes
            held_bytes -= sum(p.nbytes for p in streams.pop(i, ()))

        def take() -> tuple | None:
            """The next task to send: a retried one first, else a new one if the window and budget allow."""
            nonlocal exhausted, submitted
            if retry:
                return retry.popleft()
            if exhausted or submitted - next_out >= window or (budget is not None and cost and
                                                                sum(cost.values()) >= budget):
                return None
            try:
                i, args = next(it)
            except StopIteration:
                exhausted = True
                return None
            submitted += 1
            if cost_of is not None:
                cost[i] = next(cost_of)
            flag = True if flags is None else next(flags)
            group_of[i] = flag if batch > 1 and flag else None
            return i, args

        self.start()
        while self._starting:
            # NB: one that cannot start is stopped by `_ready`, the others still starting by `close`
            self._slots.append(self._ready(self._starting.pop(0)))
        while True:
            for slot in self._slots:
                while _messages(slot["queue"]) < 2:
                    first = take()
                    if first is None:
                        break
                    message = [first]
                    while len(message) < batch and group_of.get(first[0]) is not None and first[0] not in solo:
                        more = take()
                        if more is None:
                            break
                        if more[0] in solo or group_of.get(more[0]) != group_of[first[0]]:
                            retry.appendleft(more)  # NB: it goes alone, next
                            break
                        message.append(more)
                    if not slot["queue"]:
                        slot["deadline"] = time.monotonic() + self.timeout
                    try:
                        slot["conn"].send(message[0][1] if len(message) == 1 else [args for _, args in message])
                    except (OSError, ValueError):
                        # NB: a child that died while idle: the tasks go to another child, this one is replaced
                        retry.extendleft(reversed(message))
                        if slot["queue"] and slot["queue"][0][0] in streamed:
                            # NB: ...or one that died while streaming: the parts the caller has must not come twice
                            slot["proc"].kill()
                            code = slot["proc"].wait()
                            drop(self._fail(self._slots.index(slot), TaskFailure(
                                "decoder-crash", f"the worker process died (exit code {code}) while reading the "
                                "file"), pending, retry))
                            break
                        _requeue(slot["queue"], retry)
                        self._stop(slot)
                        self._slots[self._slots.index(slot)] = self._ready(self._start())
                        break
                    group = tuple(i for i, _ in message)
                    slot["queue"].extend((i, args, group) for i, args in message)
            while True:
                queue = streams.get(next_out)
                if queue:
                    part = queue.popleft()
                    held_bytes -= part.nbytes
                    yield part
                    continue
                if next_out not in pending:
                    break
                streams.pop(next_out, None)
                streamed.discard(next_out)
                cost.pop(next_out, None)
                group_of.pop(next_out, None)
                solo.discard(next_out)
                yield pending.pop(next_out)
                next_out += 1
                if on_done:
                    on_done()
            busy = [s for s in self._slots if s["queue"]]
            if not busy:
                if exhausted and not retry:
                    return
                continue
            for s in busy:
                # NB: a child streaming a later task waits (on its socket) while the driver holds `part_budget`
                hold = parts and held_bytes >= part_budget and all(e[0] != next_out for e in s["queue"])
                if s.get("held") and not hold:
                    s["deadline"] = time.monotonic() + self.timeout  # NB: its wait on the driver is not its time
                s["held"] = hold
            live = [s for s in busy if not s["held"]]
            if not live:
                # NB: the oldest task is always queued in some child: kept as a guard against a stall
                for s in busy:
                    s["held"] = False
                live = busy
            timeout = max(0.0, min(s["deadline"] for s in live) - time.monotonic())
            ready = wait([s["conn"] for s in live], timeout=timeout)
            for k, slot in enumerate(self._slots):
                if not slot["queue"] or slot.get("held"):
                    continue
                if slot["conn"] in ready:
                    try:
                        msg, nbytes = _receive(slot["conn"])
                    except (EOFError, OSError):
                        # NB: the child's end closes only when it dies: EOF here is a crash on its current task
                        slot["proc"].kill()  # NB: harmless on a dead child; wait() then gives its own status
                        code = slot["proc"].wait()
                        if self._shared(slot, streamed):
                            self._split(k, retry, solo)
                            continue
                        drop(self._fail(k, TaskFailure("decoder-crash", f"the worker process died (exit code "
                                                       f"{code}) while reading the file"), pending, retry))
                        continue
                    if msg[0] == "part":
                        # NB: a streamed result (`Streamed`): its items arrive before its head; the task goes on
                        slot["deadline"] = time.monotonic() + self.timeout
                        if parts:
                            i = slot["queue"][0][0]
                            streams.setdefault(i, deque()).append(Part(msg[1], nbytes))
                            streamed.add(i)
                            held_bytes += nbytes
                            self.peak_part_bytes = max(self.peak_part_bytes, held_bytes)
                        else:
                            slot["parts"].extend(msg[1])
                        continue
                    i = slot["queue"].popleft()[0]
                    gathered, slot["parts"] = slot["parts"], []
                    if msg[0] == "ok" and isinstance(msg[1], tuple) and msg[1][:1] == ("streamed",):
                        _, key, head = msg[1]
                        pending[i] = {**head, key: gathered}
                    else:
                        pending[i] = msg[1] if msg[0] == "ok" else TaskFailure(msg[1], msg[2])
                        drop(i)  # NB: a task that failed after some parts (e.g. out of memory while sending)
                    slot["deadline"] = time.monotonic() + self.timeout
                elif time.monotonic() >= slot["deadline"]:
                    if self._shared(slot, streamed):
                        slot["proc"].kill()
                        slot["proc"].wait()
                        self._split(k, retry, solo)
                        continue
                    drop(self._fail(k, TaskFailure("decode-timeout", f"reading took more than {self.timeout:g} s"),
                                    pending, retry))

    @staticmethod
    def _shared(slot: dict, streamed: set) -> bool:
        """Whether the child's current task came in a message with others (and streamed nothing yet): its crash
        or overrun then blames no task until each is tried alone."""
        i, _, group = slot["queue"][0]
        return len(group) > 1 and i not in streamed

    def _split(self, k: int, retry: deque, solo: set) -> None:
        """The child of slot `k` died or overran on a message of several tasks: the unanswered tasks of that
        message are sent again, each alone (`solo`), the child's later messages as they were; the child is
        replaced."""
        slot = self._slots[k]
        group = slot["queue"][0][2]
        solo.update(e[0] for e in slot["queue"] if e[2] is group)
        _requeue(slot["queue"], retry)
        self._stop(slot)
        self._slots[k] = self._ready(self._start())

    def _fail(self, k: int, failure: TaskFailure, pending: dict, retry: deque) -> int:
        """The child of slot `k` crashed or overran on its current task: record it, requeue the rest, replace
        the child; returns the task's number."""
        slot = self._slots[k]
        i = slot["queue"].popleft()[0]
        pending[i] = failure
        _requeue(slot["queue"], retry)
        self._stop(slot)
        self._slots[k] = self._ready(self._start())
        return i


def _messages(queue: deque) -> int:
    """Messages a child holds: its queued tasks, those sent together counted once."""
    n, last = 0, None
    for entry in queue:
        if entry[2] is not last:
            n, last = n + 1, entry[2]
    return n


def _requeue(queue: deque, retry: deque) -> None:
    """A child's queued tasks go back to the front of `retry`, in order (to be sent to another child)."""
    retry.extendleft(reversed([(i, args) for i, args, _ in queue]))
    queue.clear()


if __name__ == "__main__":
    _child(Connection(int(sys.argv[1])), sys.argv[2], int(sys.argv[3]) or None,
           int(sys.argv[4]) if len(sys.argv) > 4 else None)
