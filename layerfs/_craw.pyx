# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled raw path (LAYERFS_LOOP=craw): fusehooks._RawPath's work without the interpreter.

The poll loop's wait calls ``RawPath.take`` once /dev/fuse is readable. ``take`` reads the
request into this object's buffer, parses the header and answers LOOKUP, GETATTR, GETXATTR,
FORGET and BATCH_FORGET: one Python call to the adapter's synchronous core with the arguments
already unpacked (node id, name), the reply packed from the core's Attr in C and written.
Any other request stays in the buffer; libfuse reads it from there through the session's
custom io, whose ``read`` is the C function ``_io_read`` (no ctypes callback: that cost a
request handed on ~4.5k instructions in session 13's Python raw path).

What the Python raw path keeps is kept here (docs/concurrency.md, the raw path): the lookup
count (a refused reply gives the reference back), pyfuse3's reply fields, the adapter's
errnos (``errno_of`` for anything raised), the request counters, the attribute
invalidations after a core, a reply held until the listings a core (or a READDIR before it)
queued are dropped, the ``--debug`` trace, the session's end when the device is gone.
Built by scripts/setup.sh (Cython, then gcc); never committed. Without it the Python paths
serve.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_READ
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, ENODATA, ENODEV, ENOENT, ERANGE, EIO, errno
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import logging

log = logging.getLogger("layerfs.fusehooks")


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<linux/fuse.h>" nogil:
    struct fuse_in_header:
        uint32_t len
        uint32_t opcode
        uint64_t unique
        uint64_t nodeid
        uint32_t uid
        uint32_t gid
        uint32_t pid
    struct fuse_out_header:
        uint32_t len
        int32_t error
        uint64_t unique
    struct fuse_attr:
        uint64_t ino, size, blocks, atime, mtime, ctime
        uint32_t atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
    struct fuse_entry_out:
        uint64_t nodeid, generation, entry_valid, attr_valid
        uint32_t entry_valid_nsec, attr_valid_nsec
        fuse_attr attr
    struct fuse_attr_out:
        uint64_t attr_valid
        uint32_t attr_valid_nsec, dummy
        fuse_attr attr
    struct fuse_getxattr_in:
        uint32_t size
        uint32_t padding
    struct fuse_getxattr_out:
        uint32_t size
        uint32_t padding
    struct fuse_setattr_in:
        uint32_t valid
        uint64_t fh, size, atime, mtime
        uint32_t atimensec, mtimensec, mode, uid, gid
    struct fuse_mknod_in:
        uint32_t mode, rdev, umask
    struct fuse_write_in:
        uint64_t fh, offset
        uint32_t size, write_flags
        uint64_t lock_owner
        uint32_t flags, padding
    struct fuse_write_out:
        uint32_t size, padding
    struct fuse_forget_in:
        uint64_t nlookup
    struct fuse_batch_forget_in:
        uint32_t count
        uint32_t dummy
    struct fuse_forget_one:
        uint64_t nodeid
        uint64_t nlookup
    enum:
        FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR, FUSE_MKNOD, FUSE_GETXATTR
        FUSE_BATCH_FORGET, FUSE_WRITE
        FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE, FATTR_ATIME, FATTR_MTIME, FATTR_FH
        FATTR_ATIME_NOW, FATTR_MTIME_NOW

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_REALTIME, CLOCK_MONOTONIC

cdef extern from "<fuse_lowlevel.h>" nogil:
    struct fuse_session:
        pass
    struct fuse_custom_io:
        ssize_t (*writev)(int fd, iovec *iov, int count, void *userdata)
        ssize_t (*read)(int fd, void *buf, size_t buf_len, void *userdata)
        void *splice_receive
        void *splice_send
    int fuse_session_custom_io(fuse_session *se, const fuse_custom_io *io, int fd)
    void fuse_session_exit(fuse_session *se)


cdef struct Reply_entry:
    fuse_out_header h
    fuse_entry_out e

cdef struct Reply_attr:
    fuse_out_header h
    fuse_attr_out a

cdef struct Reply_xattr_size:
    fuse_out_header h
    fuse_getxattr_out x

cdef struct Reply_write:
    fuse_out_header h
    fuse_write_out w


# What take and serve tell the wait (fusehooks._PollLoop._wait_compiled)
cdef enum Code:
    C_NOPOLL = 0  # serve: not polled (a timer is set, or trio may run something): poll in Python
    C_PENDING = 1  # a request is left for libfuse (or the device could not be read)
    C_TRIO = 2  # serve: polled, and trio has something ready: wait through trio, then take
    C_PARKED = 3  # a core's coroutine awaits: the wait awaits the rest (``parked``, ``finish``)
    C_ANSWERED = 4  # take: answered here

NOPOLL, PENDING, TRIO, PARKED, ANSWERED = C_NOPOLL, C_PENDING, C_TRIO, C_PARKED, C_ANSWERED

# the reply a parked coroutine's result goes into
cdef enum Kind:
    K_ATTR = 1  # SETATTR: fuse_attr_out
    K_ENTRY = 2  # MKNOD: fuse_entry_out, one lookup counted

# libfuse 3's se->bufsize: FUSE_MAX_MAX_PAGES (256) pages and a header page
cdef size_t BUFSIZE = 256 * 4096 + 4096
cdef uint64_t NODE_FH = (<uint64_t>1) << 62  # files.NODE_FH: a handle naming a node (no OPEN)
cdef int64_t NS = 1000000000

# The state the io callback reads: plain C, no interpreter (libfuse may call it with or
# without the GIL held: pyfuse3's loop holds it, answer_init's ctypes call does not). A
# process serving several mounts (layerfs.share: one pyfuse3 copy and one thread a mount)
# has one state a mount, found by the session's fd in a table of SLOTS; a state whose
# session ended is dead (its buffer freed), and its slot taken by the next mount. The
# states live in their RawPath objects, which are never freed (_installed): a slot never
# points at freed memory, whichever thread reads it.
cdef struct State:
    int fd
    char *buf
    ssize_t pending  # length of the request left for libfuse, or -1
    int failed  # the device could not be read: the session ends
    int dead  # the session ended: nothing here is used again
    fuse_session *session

DEF SLOTS = 64
cdef State *_states[SLOTS]


cdef State *_find(int fd) noexcept nogil:
    cdef int i
    cdef State *st
    for i in range(SLOTS):
        st = _states[i]
        if st != NULL and st.fd == fd and not st.dead:
            return st
    return NULL


cdef ssize_t _io_read(int fd, void *buf, size_t size, void *userdata) noexcept nogil:
    """The session io's read (libfuse's fuse_session_receive_buf): the request the wait
    left, copied into libfuse's buffer; a read of the device where the wait read nothing
    (INIT, answered before the loop starts); ENODEV once the wait found the device gone."""
    cdef State *st = _find(fd)
    cdef ssize_t n
    if st == NULL:
        return read(fd, buf, size)
    n = st.pending
    if n >= 0:
        st.pending = -1
        if <size_t>n > size:  # not met: libfuse's buffer is as large as ours
            st.failed = 1
        else:
            memcpy(buf, st.buf, n)
            return n
    if st.failed:  # libfuse ends the session on ENODEV; the state is not used again
        fuse_session_exit(st.session)
        st.dead = 1
        free(st.buf)
        st.buf = NULL
        errno = ENODEV
        return -1
    return read(fd, buf, size)


cdef ssize_t _io_writev(int fd, iovec *iov, int count, void *userdata) noexcept nogil:
    return writev(fd, iov, count)


cdef inline void _split(int64_t ns, uint64_t *secs, uint32_t *nsecs) noexcept:
    """Nanoseconds since the epoch into seconds and nanoseconds, floored (times before the
    epoch: -1.5 s is -2 s and 500 ms), as divmod does."""
    cdef int64_t s = ns // NS
    cdef int64_t r = ns % NS
    if r < 0:
        r += NS
        s -= 1
    secs[0] = <uint64_t>s
    nsecs[0] = <uint32_t>r


cdef int _time(object ns, uint64_t *secs, uint32_t *nsecs) except -1:
    """_split of NS, a Python int: past a signed 64-bit count of nanoseconds (before 1677,
    after 2262; ext4 keeps times up to 2446) split by Python's divmod. Converted to int64
    first, such a time raised OverflowError: its LOOKUP answered EIO."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(ns, &overflow)
    if overflow:
        s, r = divmod(ns, NS)
        secs[0] = <uint64_t><int64_t>s
        nsecs[0] = <uint32_t>r
    else:
        _split(v, secs, nsecs)
    return 0


cdef int _fill(fuse_attr *out, object a) except -1:
    """OUT from the Attr A (id, ino, mode, nlink, uid, gid, rdev, size, blksize, blocks,
    atime_ns, mtime_ns, ctime_ns), as libfuse fills it from pyfuse3's EntryAttributes."""
    cdef tuple t = <tuple>a
    if PyTuple_GET_SIZE(t) != 13:
        raise ValueError("not an Attr")
    out.ino = <uint64_t>t[1]
    out.mode = <uint32_t>t[2]
    out.nlink = <uint32_t>t[3]
    out.uid = <uint32_t>t[4]
    out.gid = <uint32_t>t[5]
    out.rdev = <uint32_t>(<uint64_t>t[6] & 0xFFFFFFFFu)
    out.size = <uint64_t>t[7]
    out.blksize = <uint32_t>t[8]
    out.blocks = <uint64_t>t[9]
    _time(t[10], &out.atime, &out.atimensec)
    _time(t[11], &out.mtime, &out.mtimensec)
    _time(t[12], &out.ctime, &out.ctimensec)
    out.flags = 0
    return 0


cdef inline void _add(object counts, object key, uint64_t n) except *:
    cdef PyObject *v
    if n:
        v = PyDict_GetItemWithError(counts, key)
        PyDict_SetItem(counts, key, (<object>v) + n if v != NULL else n)


cdef class RawPath:
    """The raw path's state and its request handling (see the module's docstring).

    FIND(parent, name) -> Attr | None (one lookup counted; None, or FileNotFoundError
    raised: a negative entry, as the adapter's ``_find``);
    GETATTR(node) -> Attr; FIND_XATTR(node, name) -> bytes | None (None: ENODATA);
    STATS_XATTR(node, name) -> bytes: the adapter's getxattr core, asked for STATS_NAME on
    the root only; FORGET([(node, n), ...]). Each may raise: ERRNO_OF(handler name, args,
    exception) gives the errno answered (the handlers' mapping). REQUESTS counts each
    request answered by handler name, COUNTS ``loop_raw``; CHANGED is the copy-up's list of
    nodes whose attributes to invalidate, AFTER() invalidates them (called when it is not
    empty); while its LISTINGS is not empty a reply goes to DEFER(reply, node) instead, to
    be written once they are dropped (fusehooks._Replies). TRACE(handler name, args), where
    not None (``--debug``), logs each request answered here. The counts are kept in C and added to REQUESTS and COUNTS by ``flush``,
before the statistics are read. RELEASE: the read and the write release the GIL (for
    measuring: holding it, as pyfuse3's own read and write do, was 0.8k instructions a
    failed lookup cheaper; docs/benchmarks.md, session 14 cloop)."""

    cdef State st
    cdef object find, getattr_, find_xattr, stats_xattr, stats_name, forget, errno_of
    cdef object setattr_, mknod
    cdef object defer, trace
    cdef object write_  # serve_write
    cdef object setattr_fd  # serve_setattr_fd
    cdef uint64_t n_setattr_fd
    cdef uint64_t n_write
    cdef object requests, counts, after
    cdef list changed, listings
    cdef uint64_t secs
    cdef uint32_t nsecs
    cdef public bint release
    cdef Reply_entry negative
    cdef uint64_t n_lookup, n_getattr, n_getxattr, n_raw, n_poll, n_setattr, n_mknod
    cdef uint64_t n_cpoll  # of n_poll, those serve made (the rest: the Python poll's)
    cdef public object parked  # (coroutine, what it yielded) of a core that awaits
    cdef uint64_t parked_unique
    cdef int parked_kind
    cdef str parked_name
    cdef tuple parked_args
    # trio's next deadline as _sleep found it: the heap it read (list, length, first
    # entry) and the deadline in CLOCK_MONOTONIC seconds
    cdef object heap_seen, first_seen
    cdef Py_ssize_t size_seen
    cdef double until

    def __cinit__(self):
        self.st.buf = <char *>malloc(BUFSIZE)
        if self.st.buf == NULL:
            raise MemoryError()
        self.st.pending = -1
        self.st.fd = -1

    def __init__(
        self, int fd, find, getattr, find_xattr, stats_xattr, bytes stats_name, forget,
        errno_of, requests, counts, list changed, list listings, after, double timeout,
        bint release=False, setattr=None, mknod=None, defer=None, trace=None,
    ):
        self.setattr_, self.mknod = setattr, mknod
        self.defer, self.trace = defer, trace
        self.st.fd = fd
        self.find, self.getattr_, self.find_xattr = find, getattr, find_xattr
        self.stats_xattr, self.stats_name = stats_xattr, stats_name
        self.forget, self.errno_of = forget, errno_of
        self.requests, self.counts, self.after = requests, counts, after
        self.changed, self.listings = changed, listings
        self.secs = <uint64_t>timeout
        self.nsecs = <uint32_t>((timeout - <double>self.secs) * 1e9)
        self.release = release
        # a negative entry: node id 0, cached for the entry timeout; the request id set later
        self.negative.h.len = sizeof(Reply_entry)
        self.negative.h.error = 0
        self.negative.e.nodeid = 0
        self.negative.e.generation = 0
        self.negative.e.entry_valid = self.secs
        self.negative.e.attr_valid = 0
        self.negative.e.entry_valid_nsec = self.nsecs
        self.negative.e.attr_valid_nsec = 0
        self.negative.e.attr.ino = 0
        _zero_attr(&self.negative.e.attr)

    def __dealloc__(self):  # only a RawPath never installed
        free(self.st.buf)

    def install(self, uint64_t session):
        """Point the session's io at this raw path; False (nothing changed) if libfuse
        refuses. Call before INIT is answered."""
        cdef fuse_custom_io io
        cdef int i
        cdef int slot = -1
        io.writev = _io_writev
        io.read = _io_read
        io.splice_receive = NULL
        io.splice_send = NULL
        if session == 0 or self.st.fd < 0 or self.st.session != NULL:
            return False
        for i in range(SLOTS):
            if _states[i] == NULL or _states[i].dead:
                slot = i
                break
        if slot < 0:
            log.warning("raw path: more than %d sessions in one process", SLOTS)
            return False
        if fuse_session_custom_io(<fuse_session *>session, &io, self.st.fd) != 0:
            return False  # libfuse copies IO
        self.st.session = <fuse_session *>session
        _installed.append(self)  # never freed: its slot may be read by another thread
        _states[slot] = &self.st
        return True

    def flush(self):
        """Add the requests counted since the last flush to REQUESTS and COUNTS."""
        _add(self.requests, "lookup", self.n_lookup)
        _add(self.requests, "getattr", self.n_getattr)
        _add(self.requests, "getxattr", self.n_getxattr)
        _add(self.requests, "setattr", self.n_setattr)
        _add(self.requests, "mknod", self.n_mknod)
        _add(self.requests, "write", self.n_write)
        _add(self.counts, "loop_raw", self.n_raw)
        _add(self.counts, "loop_poll", self.n_poll)
        _add(self.counts, "loop_cpoll", self.n_cpoll)
        _add(self.counts, "loop_setattr_fd", self.n_setattr_fd)
        self.n_lookup = self.n_getattr = self.n_getxattr = self.n_raw = self.n_poll = 0
        self.n_cpoll = self.n_setattr_fd = 0
        self.n_setattr = self.n_mknod = self.n_write = 0

    def serve(self, loop, runner, int epoll_fd):
        """The poll loop's wait (fusehooks._PollLoop) in C while it only answers: poll
        /dev/fuse and trio's epoll fd EPOLL_FD, and answer what /dev/fuse alone has, as long
        as trio could run nothing meanwhile (LOOP's ``counting`` and ``runnable``, RUNNER's
        ``waiting_for_idle``) and no timer of trio's is due: the poll ends by the next one
        (``_sleep``; LOOP's ``timers`` false: NOPOLL while one is set). Return NOPOLL where
        it did not poll (the Python poll then decides), PENDING when a request is left for
        libfuse (or the device could not be read), TRIO when it polled and trio has
        something ready, a timer came due or a signal came: wait through trio; PARKED as
        take. The poll releases the GIL, as select.poll does (worker threads may need it)."""
        cdef pollfd fds[2]
        cdef int r
        cdef int got
        cdef int ms
        fds[0].fd = self.st.fd
        fds[0].events = POLLIN
        fds[1].fd = epoll_fd
        fds[1].events = POLLIN
        deadlines = runner.deadlines
        timers = loop.timers
        while True:
            if not loop.counting or loop.runnable or runner.waiting_for_idle:
                return C_NOPOLL
            ms = self._sleep(deadlines, runner.clock) if timers else (
                0 if deadlines._heap else -1
            )
            if ms == 0:
                return C_NOPOLL
            with nogil:
                r = poll(fds, 2, ms)
            if r <= 0 or fds[1].revents or not fds[0].revents:
                return C_TRIO  # EINTR: the signal reaches trio through its wake-up fd
            self.n_poll += 1
            self.n_cpoll += 1
            got = self._take()
            if got != C_ANSWERED:
                return got

    cdef int _sleep(self, object deadlines, object clock) except -2:
        """How long the poll may sleep before trio's next timer (DEADLINES, of trio's
        runner: a heap of (deadline, id, cancel scope), CLOCK trio's system clock, which
        runs as CLOCK_MONOTONIC): -1 (none set), 0 (due: let trio run it), or ms, as
        fusehooks._PollLoop._poll bounds its poll. Trio's deadline is read again only when
        its heap changed (a push or a pop, a new list when pruned): an entry gone stale
        meanwhile (its scope left) only wakes the poll early, which trio then sorts out."""
        cdef timespec now
        cdef double left
        heap = deadlines._heap
        if not PyList_GET_SIZE(heap):
            return -1
        if (
            heap is not self.heap_seen
            or PyList_GET_SIZE(heap) != self.size_seen
            or <object>PyList_GET_ITEM(heap, 0) is not self.first_seen
        ):
            deadline = deadlines.next_deadline()  # pops stale entries
            if deadline == float("inf"):
                return -1
            trio_now = clock.current_time()
            clock_gettime(CLOCK_MONOTONIC, &now)
            self.until = <double>now.tv_sec + <double>now.tv_nsec * 1e-9 + (
                <double>deadline - <double>trio_now
            )
            heap = deadlines._heap  # as next_deadline left it
            self.heap_seen, self.size_seen = heap, PyList_GET_SIZE(heap)
            self.first_seen = <object>PyList_GET_ITEM(heap, 0)
        clock_gettime(CLOCK_MONOTONIC, &now)
        left = self.until - (<double>now.tv_sec + <double>now.tv_nsec * 1e-9)
        if left <= 0:
            return 0
        if left > 86400.0:
            return 86400000  # trio's own longest sleep, a day (_MAX_POLL_MS)
        return <int>(left * 1000) + 1

    @property
    def failed(self):
        return bool(self.st.failed)

    def take(self):
        """Read the request /dev/fuse has (the fd is blocking: call only when it is
        readable): ANSWERED here, PENDING (left for libfuse), or PARKED: a core awaits."""
        return self._take()

    cdef int _take(self) except -1:
        cdef ssize_t n
        cdef int got = C_ANSWERED
        cdef int err
        cdef fuse_in_header *h
        if self.st.buf == NULL:  # the session ended
            return C_PENDING
        if self.release:
            with nogil:
                n = read(self.st.fd, self.st.buf, BUFSIZE)
        else:
            n = read(self.st.fd, self.st.buf, BUFSIZE)
        if n < 0:
            err = errno
            if err == EINTR or err == EAGAIN or err == ENOENT:
                return C_PENDING  # nothing read: libfuse's own read takes it
            if err != ENODEV:  # ENODEV once unmounted
                log.error("raw path: reading the device failed: errno %d", err)
            self.st.failed = 1
            return C_PENDING
        h = <fuse_in_header *>self.st.buf
        if n < <ssize_t>sizeof(fuse_in_header):
            self.st.pending = n
            return C_PENDING
        if h.opcode == FUSE_LOOKUP:
            self._lookup(h.unique, h.nodeid, n)
        elif h.opcode == FUSE_GETATTR:
            self._getattr(h.unique, h.nodeid)
        elif h.opcode == FUSE_GETXATTR:
            self._getxattr(h.unique, h.nodeid, n)
        elif h.opcode == FUSE_FORGET:
            self._forget(h.nodeid, n)
        elif h.opcode == FUSE_BATCH_FORGET:
            self._batch_forget(n)
        elif h.opcode == FUSE_SETATTR and self.setattr_ is not None:
            got = self._setattr(h, n)
        elif h.opcode == FUSE_MKNOD and self.mknod is not None:
            got = self._mknod(h, n)
        elif h.opcode == FUSE_WRITE and self.write_ is not None:
            got = self._write(h, n)
        else:
            got = C_PENDING
        if got == C_PENDING:
            self.st.pending = n
        else:
            self.n_raw += 1
        return got

    cdef int _send(self, const void *data, size_t size, uint64_t node=0) except -1:
        """Write one reply. One the kernel refuses (ENOENT: the request was aborted) gives
        the reference counted for NODE back (0: none). While the copy-up has listings to
        invalidate, a copy of it goes to DEFER(reply, node) instead, which writes it once
        they are dropped (fusehooks._Replies, the Python raw path's too)."""
        cdef ssize_t r
        cdef int err
        if PyList_GET_SIZE(self.listings):
            self.defer(PyBytes_FromStringAndSize(<const char *>data, size), node)
            return 0
        if self.release:
            with nogil:
                r = write(self.st.fd, data, size)
        else:
            r = write(self.st.fd, data, size)
        if r < 0:
            err = errno
            if err != ENOENT:
                log.error("raw path: reply failed: errno %d", err)
            if node:  # the kernel took no reference: give back ours
                self.forget([(node, 1)])
        return 0

    cdef int _error(self, uint64_t unique, int err) except -1:
        cdef fuse_out_header h
        h.len = sizeof(fuse_out_header)
        h.error = -err
        h.unique = unique
        return self._send(&h, sizeof(h))

    cdef int _done(self) except -1:
        """After a core: the attribute invalidations it left (a copy-up); the listings it
        left (``Overlay.fix_origin``) delay its reply (``_send``)."""
        if PyList_GET_SIZE(self.changed):
            self.after()
        return 0

    cdef int _failed(self, str name, tuple args, object e) except -1:
        return <int>self.errno_of(name, args, e)

    cdef int _lookup(self, uint64_t unique, uint64_t parent, ssize_t n) except -1:
        cdef bytes name = PyBytes_FromStringAndSize(
            self.st.buf + sizeof(fuse_in_header), n - <ssize_t>sizeof(fuse_in_header) - 1
        )  # without its NUL
        cdef object a
        self.n_lookup += 1
        if self.trace is not None:
            self.trace("lookup", (parent, name))
        try:
            a = self.find(parent, name)
        except FileNotFoundError:  # met on the way (a layer's file gone): negative too
            a = None
        except Exception as e:
            self._done()
            return self._error(unique, self._failed("lookup", (parent, name), e))
        self._done()
        if a is None:  # a negative entry, cached by the kernel for the entry timeout
            self.negative.h.unique = unique
            return self._send(&self.negative, sizeof(Reply_entry))
        return self._entry(unique, a, "lookup", (parent, name))

    cdef int _getattr(self, uint64_t unique, uint64_t node) except -1:
        cdef Reply_attr r
        cdef object a
        self.n_getattr += 1
        if self.trace is not None:
            self.trace("getattr", (node,))
        try:
            a = self.getattr_(node)
            r.h.len = sizeof(Reply_attr)
            r.h.error = 0
            r.h.unique = unique
            r.a.attr_valid = self.secs
            r.a.attr_valid_nsec = self.nsecs
            r.a.dummy = 0
            _fill(&r.a.attr, a)
        except Exception as e:
            self._done()
            return self._error(unique, self._failed("getattr", (node,), e))
        self._done()
        return self._send(&r, sizeof(r))

    cdef int _getxattr(self, uint64_t unique, uint64_t node, ssize_t n) except -1:
        cdef ssize_t start = sizeof(fuse_in_header) + sizeof(fuse_getxattr_in)
        cdef uint32_t size = (<fuse_getxattr_in *>(self.st.buf + sizeof(fuse_in_header))).size
        cdef bytes name = PyBytes_FromStringAndSize(self.st.buf + start, n - start - 1)
        cdef object value
        cdef Reply_xattr_size rs
        cdef fuse_out_header h
        cdef iovec iov[2]
        cdef ssize_t length
        cdef ssize_t r
        self.n_getxattr += 1
        if self.trace is not None:
            self.trace("getxattr", (node, name))
        try:
            if node == 1 and name == self.stats_name:  # the daemon's counters
                self.flush()
                value = self.stats_xattr(node, name)
            else:
                value = self.find_xattr(node, name)
        except Exception as e:
            self._done()
            return self._error(unique, self._failed("getxattr", (node, name), e))
        self._done()
        if value is None:
            return self._error(unique, ENODATA)
        length = PyBytes_GET_SIZE(<bytes>value)
        if size == 0:  # the size is asked
            rs.h.len = sizeof(rs)
            rs.h.error = 0
            rs.h.unique = unique
            rs.x.size = <uint32_t>length
            rs.x.padding = 0
            return self._send(&rs, sizeof(rs))
        if length > size:
            return self._error(unique, ERANGE)
        h.len = <uint32_t>(sizeof(h) + length)
        h.error = 0
        h.unique = unique
        if PyList_GET_SIZE(self.listings):  # as _send
            self.defer(PyBytes_FromStringAndSize(<const char *>&h, sizeof(h)) + value, 0)
            return 0
        iov[0].iov_base = &h
        iov[0].iov_len = sizeof(h)
        iov[1].iov_base = PyBytes_AS_STRING(<bytes>value)
        iov[1].iov_len = length
        if self.release:
            with nogil:
                r = writev(self.st.fd, iov, 2)
        else:
            r = writev(self.st.fd, iov, 2)
        if r < 0 and errno != ENOENT:
            log.error("raw path: reply failed: errno %d", errno)
        return 0

    cdef int _run(self, object coro, uint64_t unique, int kind, str name, tuple args) except -1:
        """Step the core's coroutine CORO once: its result answered (ANSWERED), or PARKED
        where it awaits something (the wait then awaits the rest and calls ``finish``)."""
        cdef object result
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            result = stop.value
        except Exception as e:
            self._done()
            self._error(unique, self._failed(name, args, e))
            return C_ANSWERED
        else:
            self.parked = (coro, yielded)
            self.parked_unique, self.parked_kind = unique, kind
            self.parked_name, self.parked_args = name, args
            return C_PARKED
        self._done()
        self._answer(unique, kind, result, name, args)
        return C_ANSWERED

    def finish(self, result, exc):
        """The parked coroutine returned RESULT or raised EXC (not None): answer it."""
        self.parked = None
        self._done()
        if exc is not None:
            self._error(self.parked_unique, self._failed(self.parked_name, self.parked_args, exc))
        else:
            self._answer(self.parked_unique, self.parked_kind, result, self.parked_name,
                         self.parked_args)

    cdef int _answer(self, uint64_t unique, int kind, object a, str name, tuple args) except -1:
        """Answer a SETATTR (fuse_attr_out) or a MKNOD (fuse_entry_out) with the Attr A."""
        cdef Reply_attr ra
        if kind == K_ENTRY:
            return self._entry(unique, a, name, args)
        try:
            ra.h.len = sizeof(Reply_attr)
            ra.h.error = 0
            ra.h.unique = unique
            ra.a.attr_valid = self.secs
            ra.a.attr_valid_nsec = self.nsecs
            ra.a.dummy = 0
            _fill(&ra.a.attr, a)
        except Exception as e:  # not met: an Attr the protocol cannot carry
            return self._error(unique, self._failed(name, args, e))
        return self._send(&ra, sizeof(ra))

    cdef int _entry(self, uint64_t unique, object a, str name, tuple args) except -1:
        """Answer a LOOKUP or a MKNOD (fuse_entry_out) with the Attr A, whose node the core
        counted a lookup of: given back where the reply cannot be made or is refused."""
        cdef Reply_entry r
        try:
            r.h.len = sizeof(Reply_entry)
            r.h.error = 0
            r.h.unique = unique
            r.e.nodeid = <uint64_t>(<tuple>a)[0]
            r.e.generation = 0
            r.e.entry_valid = r.e.attr_valid = self.secs
            r.e.entry_valid_nsec = r.e.attr_valid_nsec = self.nsecs
            _fill(&r.e.attr, a)
        except Exception as e:  # not met: an Attr the protocol cannot carry
            self.forget([(a[0], 1)])
            return self._error(unique, self._failed(name, args, e))
        return self._send(&r, sizeof(r), r.e.nodeid)

    cdef int _setattr(self, fuse_in_header *h, ssize_t n) except -1:
        """SETATTR as libfuse (do_setattr) and pyfuse3 (fuse_setattr_async) hand it to the
        adapter: each field None unless its bit is set; *_NOW: the realtime clock's now."""
        cdef fuse_setattr_in *a = <fuse_setattr_in *>(self.st.buf + sizeof(fuse_in_header))
        cdef uint32_t valid
        cdef timespec now
        cdef object coro
        cdef int got
        if n < <ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_setattr_in)):
            return C_PENDING
        valid = a.valid
        if valid & (FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            clock_gettime(CLOCK_REALTIME, &now)
        args = (
            h.nodeid,
            a.mode if valid & FATTR_MODE else None,
            a.uid if valid & FATTR_UID else None,
            a.gid if valid & FATTR_GID else None,
            a.size if valid & FATTR_SIZE else None,
            # in Python ints: a time past 2262 wrapped in int64 (a wrong time stored)
            (<object>(<int64_t>a.atime) * NS + a.atimensec) if valid & FATTR_ATIME else (
                (<int64_t>now.tv_sec * NS + now.tv_nsec) if valid & FATTR_ATIME_NOW else None
            ),
            (<object>(<int64_t>a.mtime) * NS + a.mtimensec) if valid & FATTR_MTIME else (
                (<int64_t>now.tv_sec * NS + now.tv_nsec) if valid & FATTR_MTIME_NOW else None
            ),
            a.fh if valid & FATTR_FH else None,
            h.uid, h.gid, h.pid,
        )
        self.n_setattr += 1
        if self.setattr_fd is not None and not valid & FATTR_SIZE:
            got = self._setattr_fd(h.unique, args)
            if got != C_PENDING:
                return got
        try:
            coro = self.setattr_(*args)
        except Exception as e:
            if self.trace is not None:
                self.trace("setattr", args)
            self._done()
            self._error(h.unique, self._failed("setattr", args, e))
            return C_ANSWERED
        if coro is None:  # the core would wait (a copy-up): pyfuse3 serves it (and traces it)
            self.n_setattr -= 1
            return C_PENDING
        if self.trace is not None:
            self.trace("setattr", args)
        return self._run(coro, h.unique, K_ATTR, "setattr", args)

    def serve_setattr_fd(self, setattr_fd):
        """Try a SETATTR without a size first with SETATTR_FD(node, mode, uid, gid,
        atime_ns, mtime_ns): the Attr, the changes made through the descriptor the engine
        keeps on the node's upper file, no coroutine stepped (``Overlay.setattr_fd``); None:
        the SETATTR core serves it. None: that core alone."""
        self.setattr_fd = setattr_fd

    cdef int _setattr_fd(self, uint64_t unique, tuple args) except -1:
        """SETATTR (ARGS as ``_setattr`` makes them) through ``setattr_fd``: ANSWERED, or
        PENDING where it declined (nothing done)."""
        cdef object a
        try:
            a = self.setattr_fd(args[0], args[1], args[2], args[3], args[5], args[6])
        except Exception as e:
            if self.trace is not None:
                self.trace("setattr", args)
            self._done()
            self._error(unique, self._failed("setattr", args, e))
            return C_ANSWERED
        if a is None:
            return C_PENDING
        if self.trace is not None:
            self.trace("setattr", args)
        self.n_setattr_fd += 1
        self._done()
        self._answer(unique, K_ATTR, a, "setattr", args)
        return C_ANSWERED

    cdef int _mknod(self, fuse_in_header *h, ssize_t n) except -1:
        """MKNOD as libfuse (do_mknod: the umask into the context) and pyfuse3 hand it on."""
        cdef fuse_mknod_in *a = <fuse_mknod_in *>(self.st.buf + sizeof(fuse_in_header))
        cdef ssize_t start = sizeof(fuse_in_header) + sizeof(fuse_mknod_in)
        cdef object coro
        if n <= start:
            return C_PENDING
        name = PyBytes_FromStringAndSize(self.st.buf + start, n - start - 1)
        args = (h.nodeid, name, a.mode, a.rdev, h.uid, h.gid, a.umask, h.pid)
        self.n_mknod += 1
        try:
            coro = self.mknod(*args)
        except Exception as e:
            if self.trace is not None:
                self.trace("mknod", args)
            self._done()
            self._error(h.unique, self._failed("mknod", args, e))
            return C_ANSWERED
        if coro is None:
            self.n_mknod -= 1
            return C_PENDING
        if self.trace is not None:
            self.trace("mknod", args)
        return self._run(coro, h.unique, K_ENTRY, "mknod", args)

    def serve_write(self, write):
        """Answer WRITE with WRITE(fh, offset, data, uid, gid, pid): the bytes written, or
        None (nothing done: the request goes to pyfuse3); DATA is a view of the request in
        this object's buffer, released once WRITE returns. None: every WRITE to pyfuse3."""
        self.write_ = write

    cdef int _write(self, fuse_in_header *h, ssize_t n) except -1:
        """WRITE as libfuse (do_write_buf: the data after fuse_write_in, fh 0 marked by the
        write shim as ``NODE_FH | node``; any other handle: pyfuse3 serves it) and pyfuse3 (write with the caller recorded) hand
        it to the adapter, without copying the data: a 1 MiB WRITE read into libfuse's
        buffer too cost a second copy (docs/benchmarks.md, session 15 crawwrite)."""
        cdef fuse_write_in *a = <fuse_write_in *>(self.st.buf + sizeof(fuse_in_header))
        cdef ssize_t start = sizeof(fuse_in_header) + sizeof(fuse_write_in)
        cdef Reply_write r
        cdef object got
        cdef object data
        if n < start or n - start < <ssize_t>a.size:  # libfuse answers EIO
            return C_PENDING
        if a.fh:  # a handle from an OPEN: none while OPEN is answered ENOSYS (not met)
            return C_PENDING
        fh = NODE_FH | h.nodeid
        args = (fh, <int64_t>a.offset, a.size)
        data = PyMemoryView_FromMemory(self.st.buf + start, a.size, PyBUF_READ)
        self.n_write += 1
        try:
            got = self.write_(fh, <int64_t>a.offset, data, h.uid, h.gid, h.pid)
        except Exception as e:
            data.release()
            if self.trace is not None:
                self.trace("write", args)
            self._done()
            self._error(h.unique, self._failed("write", args, e))
            return C_ANSWERED
        data.release()  # the buffer is the next request's: nothing may keep a view of it
        if got is None:  # pyfuse3 serves it (and traces it)
            self.n_write -= 1
            return C_PENDING
        if self.trace is not None:
            self.trace("write", args)
        self._done()
        r.h.len = sizeof(Reply_write)
        r.h.error = 0
        r.h.unique = h.unique
        r.w.size = <uint32_t>got
        r.w.padding = 0
        self._send(&r, sizeof(r))
        return C_ANSWERED

    cdef int _forget(self, uint64_t node, ssize_t n) except -1:  # no reply
        cdef fuse_forget_in *f = <fuse_forget_in *>(self.st.buf + sizeof(fuse_in_header))
        if n < <ssize_t>(sizeof(fuse_in_header) + sizeof(fuse_forget_in)):
            return 0
        self.forget([(node, f.nlookup)])
        return 0

    cdef int _batch_forget(self, ssize_t n) except -1:  # no reply
        cdef ssize_t start = sizeof(fuse_in_header) + sizeof(fuse_batch_forget_in)
        cdef fuse_batch_forget_in *b = <fuse_batch_forget_in *>(
            self.st.buf + sizeof(fuse_in_header)
        )
        cdef fuse_forget_one *one = <fuse_forget_one *>(self.st.buf + start)
        cdef ssize_t count = b.count
        cdef ssize_t i
        cdef list items
        if n < start:
            return 0
        if count > (n - start) // <ssize_t>sizeof(fuse_forget_one):
            count = (n - start) // <ssize_t>sizeof(fuse_forget_one)
        items = [None] * count
        for i in range(count):
            items[i] = (one[i].nodeid, one[i].nlookup)
        self.forget(items)
        return 0


cdef void _zero_attr(fuse_attr *a) noexcept:
    a.ino = a.size = a.blocks = a.atime = a.mtime = a.ctime = 0
    a.atimensec = a.mtimensec = a.ctimensec = a.mode = a.nlink = 0
    a.uid = a.gid = a.rdev = a.blksize = a.flags = 0


_installed = []  # the installed raw path lives as long as its session (the process)

cdef extern from *:
    """
    #ifndef LAYERFS_CRAW_SOURCE
    #define LAYERFS_CRAW_SOURCE ""
    #endif
    static const char layerfs_craw_source[] = LAYERFS_CRAW_SOURCE;
    """
    const char *layerfs_craw_source

# The CRC-32 of the _craw.pyx this was built from (scripts/setup.sh gives it to gcc):
# fusehooks.craw_module loads no build of another source
SOURCE = (<bytes>layerfs_craw_source).decode()

LAYOUT = (
    sizeof(fuse_in_header), sizeof(fuse_out_header), sizeof(Reply_entry), sizeof(Reply_attr),
    sizeof(Reply_xattr_size),
)
