/* The GSO cut and the GRO checks as two C loops over the rows: tun.gso_numpy's Cutter and Checker,
 * byte for byte (the tests compare them), written against the plain CPython API (no numpy headers,
 * no Cython, no cffi: nothing to install to build it but a C compiler and Python's headers).
 *
 * Why loops: numpy does a cut or a check in ~20 array calls, each a pass over the table; a loop
 * touches each row once, while it is in L1: copy the payload, sum it, write the headers.
 *
 * Two more calls serve the receive side whole: ``plan`` (tun.coalesce.Coalescer.plan after the table's
 * kind is known: group the rows by flow, check them, cut the runs) and ``merge`` (tun.coalesce.Plan.merge:
 * one run's TUN write). In Python around the checks they cost more than the checks themselves: ~100 µs
 * for a table of 4 flows' 500 rows, against ~25 µs here (docs/fast-path-profile.md). Their Python
 * versions stay the reference, and the tests require the same writes from both.
 *
 * Safety: nothing here trusts a length or an offset. Every row, packet, template and table is checked
 * against the real length of its buffer before the first byte is read or written (hostile arguments
 * raise ValueError and leave the buffers as they were); buffers are held (exported) for the whole
 * call, so a bytearray cannot be resized under us. Header fields are read and written one byte at a
 * time in network order, sums taken over native words (tun/_csum.h): no unaligned loads, no
 * architecture assumptions.
 *
 * Sums are one's complement sums taken mod 0xFFFF (2**16 = 1 mod 0xFFFF), as in tun/gso_numpy.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_csum.h"
#include "_netorder.h"

#define PROTO_TCP 6
#define PROTO_UDP 17
#define PSH 0x08
#define CWR 0x80
#define IP_HEADER 20 /* the checker's rows: IHL 5 */
#define MAX_HEADERS 120 /* IPv4 header (<= 60) + TCP header (<= 60) */
#define MAX_LENGTH 0xFFFF /* an IPv4 total length */
#define ON_STACK 256 /* rows or packets described without a heap allocation */
/* linux/virtio_net.h */
#define VNET_HDR_LEN 10
#define VNET_NEEDS_CSUM 1 /* VIRTIO_NET_HDR_F_NEEDS_CSUM */
#define VNET_GSO_TCPV4 1
#define VNET_GSO_UDP_L4 5
#define VNET_GSO_TCPV6 4
#define VNET_GSO_ECN 0x80

/* An integer argument as a long long; ValueError (not OverflowError) when it does not fit. */
static int as_int(PyObject *obj, long long *out, const char *what)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s out of range", what);
        return -1;
    }
    *out = v;
    return 0;
}

/* 1 with TypeError (the call's usage) unless ``nargs`` is ``want``. */
static int arity_wrong(Py_ssize_t nargs, Py_ssize_t want, const char *usage)
{
    if (nargs == want)
        return 0;
    PyErr_SetString(PyExc_TypeError, usage);
    return 1;
}

static PyObject *bad(const char *what)
{
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* ---- the cut ------------------------------------------------------------------------------------ */

typedef struct {
    long long at, count, last;
    unsigned ident, flags;
    uint32_t seq;
    const uint8_t *template;
} packet;

enum { P_AT, P_PROTO, P_IHL, P_HL, P_MSS, P_COUNT, P_LAST, P_TEMPLATE, P_IDENT, P_SEQ, P_FLAGS, P_FIELDS };

/* One tun.superpacket.Packet into ``p`` (and its shape into ``shape``, to compare with the first's). */
static int read_packet(PyObject *obj, packet *p, long long shape[4])
{
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) < P_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "a group holds tun.superpacket.Packet tuples");
        return -1;
    }
    static const char *names[] = {"offset", "protocol", "IHL", "header length", "segment size", "count",
                                  "last payload", "template", "IP ID", "sequence number", "flags"};
    long long v[P_FIELDS];
    for (int i = 0; i < P_FIELDS; i++)
        if (i != P_TEMPLATE && as_int(PyTuple_GET_ITEM(obj, i), &v[i], names[i]) < 0)
            return -1;
    PyObject *template = PyTuple_GET_ITEM(obj, P_TEMPLATE);
    if (!PyBytes_Check(template)) {
        PyErr_SetString(PyExc_TypeError, "a packet's template is bytes");
        return -1;
    }
    if (PyBytes_GET_SIZE(template) != v[P_HL]) {
        PyErr_SetString(PyExc_ValueError, "a packet's template is not its header length");
        return -1;
    }
    if (v[P_FLAGS] < 0 || v[P_FLAGS] > 0xFF) {
        PyErr_SetString(PyExc_ValueError, "TCP flags are one byte");
        return -1;
    }
    p->at = v[P_AT];
    p->count = v[P_COUNT];
    p->last = v[P_LAST];
    p->ident = (unsigned)(v[P_IDENT] & 0xFFFF);
    p->seq = (uint32_t)(v[P_SEQ] & 0xFFFFFFFF);
    p->flags = (unsigned)v[P_FLAGS];
    p->template = (const uint8_t *)PyBytes_AS_STRING(template);
    shape[0] = v[P_PROTO];
    shape[1] = v[P_IHL];
    shape[2] = v[P_HL];
    shape[3] = v[P_MSS];
    return 0;
}

/* The shape every packet of a group shares: the protocol, header lengths a parse can give, a segment
 * that fits an IPv4 total length. NULL if it is fine, else why not. */
static const char *shape_wrong(const long long s[4])
{
    long long proto = s[0], ihl = s[1], hl = s[2], mss = s[3];
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return "the protocol is neither TCP nor UDP";
    if (ihl < 20 || ihl > 60 || ihl % 4)
        return "bad IHL";
    if (proto == PROTO_TCP ? hl - ihl < 20 || hl - ihl > 60 || (hl - ihl) % 4 : hl != ihl + 8)
        return "bad header length";
    if (mss < 1 || hl + mss > MAX_LENGTH)
        return "bad segment size";
    return NULL;
}

/* Rows of one packet from out[d]: headers, total length, ID, IP checksum, sequence number and flags
 * (FIN/PSH on the last segment only, CWR on the first) or UDP length, payload, L4 checksum. */
static void cut_packet(const uint8_t *src, uint8_t *d, const packet *p, int proto, Py_ssize_t ihl,
                       Py_ssize_t hl, Py_ssize_t mss)
{
    const uint8_t *t = p->template;
    uint64_t addresses = be_sum(t + 12, 8);
    Py_ssize_t size = hl + mss;
    for (long long r = 0; r < p->count; r++, d += size) {
        Py_ssize_t payload = r < p->count - 1 ? mss : (Py_ssize_t)p->last;
        unsigned total = (unsigned)(hl + payload);
        memcpy(d, t, (size_t)hl);
        put16(d + 2, total);
        put16(d + 4, (unsigned)((p->ident + r) & 0xFFFF));
        put16(d + 10, (unsigned)((0xFFFF - be_sum(d, ihl) % 0xFFFF) % 0xFFFF));
        uint8_t *l4 = d + ihl;
        if (proto == PROTO_TCP) {
            uint32_t seq = (uint32_t)(p->seq + (uint64_t)r * (uint64_t)mss);
            put16(l4 + 4, seq >> 16);
            put16(l4 + 6, seq & 0xFFFF);
            if (r == p->count - 1)
                l4[13] = (uint8_t)(p->count == 1 ? p->flags : p->flags & ~CWR);
            else if (r == 0)
                l4[13] |= (uint8_t)(p->flags & CWR);
        } else {
            put16(l4 + 4, (unsigned)(8 + payload));
        }
        /* memmove: a caller may hand the same buffer as source and output */
        memmove(d + hl, src + p->at + hl + r * mss, (size_t)payload);
        uint64_t sum = addresses + (uint64_t)proto + total - ihl + be_sum(l4, hl - ihl) + be_sum(d + hl, payload);
        if (proto == PROTO_TCP)
            put16(l4 + 16, (unsigned)((0xFFFF - sum % 0xFFFF) % 0xFFFF));
        else /* never 0: UDP's "no checksum" */
            put16(l4 + 6, (unsigned)(0xFFFF - sum % 0xFFFF));
    }
}

PyDoc_STRVAR(cut_doc,
"cut(src, src8, src32, out, out8, at, group)\n--\n\n"
"Cut a group of like super-packets (tun.superpacket.Packet: same protocol, header lengths and\n"
"segment size) from ``src`` into rows of hl + mss bytes from ``out[at]``, as tun.gso_numpy.Cutter\n"
"does (``src8``, ``src32``, ``out8`` are that signature's array views, unused here). ValueError,\n"
"before anything is written, for any packet or row that does not fit its buffer.");

static PyObject *cut(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (arity_wrong(nargs, 7, "cut(src, src8, src32, out, out8, at, group)"))
        return NULL;
    long long at;
    if (as_int(args[5], &at, "at") < 0)
        return NULL;
    Py_buffer src = {0}, out = {0};
    PyObject *seq = NULL, *result = NULL;
    packet stack[ON_STACK], *packets = stack;
    /* Hold both buffers before reading the group: converting its integers may run Python code, which
     * could otherwise resize them after their lengths were checked. */
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &out, PyBUF_WRITABLE) < 0)
        goto done;
    /* A tuple of the group's own: converting a field may run Python code (__index__), which could empty
     * the caller's list and free a packet (and its template) still in use here. */
    seq = PySequence_Tuple(args[6]);
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n == 0) {
        bad("an empty group");
        goto done;
    }
    if (n > ON_STACK && (packets = PyMem_New(packet, (size_t)n)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    long long shape[4], first[4];
    long long rows = 0; /* rows the group takes in out, checked as it grows */
    for (Py_ssize_t i = 0; i < n; i++) {
        packet *p = &packets[i];
        if (read_packet(PyTuple_GET_ITEM(seq, i), p, i ? shape : first) < 0)
            goto done;
        if (i == 0) {
            const char *why = shape_wrong(first);
            if (why) {
                bad(why);
                goto done;
            }
        } else if (memcmp(shape, first, sizeof shape)) {
            bad("packets of one group differ in protocol, header lengths or segment size");
            goto done;
        }
        long long hl = first[2], mss = first[3];
        /* reads src[at + hl, at + hl + (count - 1) * mss + last) */
        if (p->at < 0 || p->at > src.len || p->count < 1 || p->last < 0 || p->last > mss
            || hl > src.len - p->at || p->count - 1 > (src.len - p->at - hl) / mss
            || p->last > src.len - p->at - hl - (p->count - 1) * mss) {
            bad("a packet does not fit its buffer");
            goto done;
        }
        /* writes out[at, at + rows * (hl + mss)) */
        if (at < 0 || at > out.len || p->count > (out.len - at) / (hl + mss) - rows) {
            bad("the rows do not fit the output buffer");
            goto done;
        }
        rows += p->count;
    }
    {
        int proto = (int)first[0];
        Py_ssize_t ihl = (Py_ssize_t)first[1], hl = (Py_ssize_t)first[2], mss = (Py_ssize_t)first[3];
        uint8_t *d = (uint8_t *)out.buf + at;
        for (Py_ssize_t i = 0; i < n; i++) {
            cut_packet((const uint8_t *)src.buf, d, &packets[i], proto, ihl, hl, mss);
            d += (Py_ssize_t)packets[i].count * (hl + mss);
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (packets != stack)
        PyMem_Free(packets);
    Py_XDECREF(seq);
    if (out.obj)
        PyBuffer_Release(&out);
    PyBuffer_Release(&src);
    return result;
}

/* ---- the whole cut: parse, group, cut ------------------------------------------------------------ */

enum { CUT_OK = 0, TOO_SHORT = 1, NOT_IPV4 = 2, BAD_HEADER = 3 }; /* tun.segment.Refused's values */
#define FIN 0x01

/* A super-packet as tun.segment.parse reads it: its cut (``p``, pointing at its own template) and
 * shape (protocol, IHL, header length, segment size). */
typedef struct {
    packet p;
    long long shape[4];
    uint8_t template[MAX_HEADERS];
} parsed;

/* tun.segment.parse, exactly, for ``n`` bytes at ``b`` (inside their buffer): CUT_OK and ``out``
 * filled, or why the packet cannot be cut. One refusal more than parse's: a segment size whose
 * segments' total length would not fit an IPv4 header (parse fails there with struct.error; the
 * kernel never hands one over). */
static int parse_packet(const uint8_t *b, long long at, long long n, long long gso_type, long long gso_size,
                        parsed *out)
{
    if (n < IP_HEADER)
        return TOO_SHORT;
    if (b[0] >> 4 != 4)
        return NOT_IPV4;
    long long type = gso_type & ~(long long)VNET_GSO_ECN;
    int proto = type == VNET_GSO_TCPV4 ? PROTO_TCP : type == VNET_GSO_UDP_L4 ? PROTO_UDP : 0;
    if (!proto)
        return type == VNET_GSO_TCPV6 ? NOT_IPV4 : BAD_HEADER;
    long long ihl = (b[0] & 0x0F) << 2;
    if (ihl < IP_HEADER || (long long)get16(b + 2) != n || b[9] != proto || (get16(b + 6) & 0x3FFF) || gso_size <= 0)
        return BAD_HEADER;
    long long hl;
    uint32_t seq = 0;
    unsigned flags = 0;
    if (proto == PROTO_TCP) {
        if (n < ihl + 20 || b[ihl + 12] < 0x50)
            return BAD_HEADER;
        seq = get32(b + ihl + 4);
        flags = b[ihl + 13];
        hl = ihl + ((b[ihl + 12] >> 4) << 2);
    } else {
        hl = ihl + 8;
    }
    if (hl > n || hl + gso_size > MAX_LENGTH)
        return BAD_HEADER;
    long long count = (n - hl + gso_size - 1) / gso_size;
    if (count == 0)
        count = 1;
    uint8_t *t = out->template;
    memcpy(t, b, (size_t)hl);
    put16(t + 2, (unsigned)(hl + gso_size)); /* a full segment's total length; ID and checksum 0 */
    put16(t + 4, 0);
    put16(t + 10, 0);
    if (proto == PROTO_TCP) {
        memset(t + ihl + 4, 0, 4);
        t[ihl + 13] = (uint8_t)(flags & ~(unsigned)(FIN | PSH | CWR));
        put16(t + ihl + 16, 0);
    } else {
        put16(t + ihl + 4, (unsigned)(8 + gso_size)); /* a full segment's UDP length; checksum 0 */
        put16(t + ihl + 6, 0);
    }
    out->p = (packet){.at = at, .count = count, .last = n - hl - (count - 1) * gso_size, .ident = get16(b + 4),
                      .flags = flags, .seq = seq, .template = t};
    out->shape[0] = proto;
    out->shape[1] = ihl;
    out->shape[2] = hl;
    out->shape[3] = gso_size;
    return CUT_OK;
}

PyDoc_STRVAR(cut_many_doc,
"cut_many(src, items, out, cut_type, refused) -> list | None\n--\n\n"
"tun.segment.Segmenter.cut's whole work in one call: parse each super-packet ``(offset, length,\n"
"gso_type, gso_size)`` of ``src``, group like neighbours, cut each group into rows from the last\n"
"group's end (8-byte aligned, from 0), as the Python Segmenter lays them out. Returns, per item, a\n"
"``cut_type`` (start, count, size, last) or ``refused[reason]``; None, having written nothing, if\n"
"``out`` is too small. ValueError for an item outside ``src``.");

static PyObject *cut_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (arity_wrong(nargs, 5, "cut_many(src, items, out, cut_type, refused)"))
        return NULL;
    PyObject *cut_type = args[3], *refused = args[4];
    if (!PyType_Check(cut_type) || !PyType_IsSubtype((PyTypeObject *)cut_type, &PyTuple_Type)
        || !PyTuple_Check(refused) || PyTuple_GET_SIZE(refused) != 4) {
        PyErr_SetString(PyExc_TypeError, "cut_type is a tuple type; refused a 4-tuple (reason -> value)");
        return NULL;
    }
    Py_buffer src = {0}, out = {0};
    PyObject *seq = NULL, *result = NULL;
    parsed *packets = NULL;
    int *codes = NULL;
    long long *starts = NULL;
    if (PyObject_GetBuffer(args[0], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &out, PyBUF_WRITABLE) < 0)
        goto done;
    if ((seq = PySequence_Tuple(args[1])) == NULL)
        goto done;
    Py_ssize_t n_items = PyTuple_GET_SIZE(seq);
    packets = PyMem_New(parsed, (size_t)n_items + 1);
    codes = PyMem_New(int, (size_t)n_items + 1);
    starts = PyMem_New(long long, (size_t)n_items + 1);
    if (packets == NULL || codes == NULL || starts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Parse all, and lay the groups out (as Segmenter._flush: each from the last one's end + 8, rounded
     * down to 8 bytes), before writing anything. */
    long long at = 0, group_at = 0, group_rows = 0;
    const long long *shape = NULL; /* the open group's */
    for (Py_ssize_t i = 0; i < n_items; i++) {
        PyObject *item = PyTuple_GET_ITEM(seq, i);
        long long v[4];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_TypeError, "an item is (offset, length, gso_type, gso_size)");
            goto done;
        }
        for (int k = 0; k < 4; k++)
            if (as_int(PyTuple_GET_ITEM(item, k), &v[k], "an item's field") < 0)
                goto done;
        if (v[0] < 0 || v[1] < 0 || v[0] > src.len || v[1] > src.len - v[0]) {
            bad("a packet does not fit its buffer");
            goto done;
        }
        codes[i] = parse_packet((const uint8_t *)src.buf + v[0], v[0], v[1], v[2], v[3], &packets[i]);
        if (shape && (codes[i] != CUT_OK || memcmp(packets[i].shape, shape, sizeof packets[i].shape))) {
            at = (group_at + group_rows * (shape[2] + shape[3]) + 8) & ~7LL; /* the open group ends */
            shape = NULL;
        }
        if (codes[i] != CUT_OK)
            continue;
        if (shape == NULL) {
            shape = packets[i].shape;
            group_at = at;
            group_rows = 0;
        }
        long long size = shape[2] + shape[3];
        starts[i] = group_at + group_rows * size;
        group_rows += packets[i].p.count;
        if (group_rows > (out.len - group_at) / size) { /* the rows would not fit: the caller grows out */
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    if ((result = PyList_New(n_items)) == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n_items; i++) {
        PyObject *value;
        if (codes[i] != CUT_OK) {
            value = Py_NewRef(PyTuple_GET_ITEM(refused, codes[i]));
        } else {
            const long long *s = packets[i].shape;
            cut_packet((const uint8_t *)src.buf, (uint8_t *)out.buf + starts[i], &packets[i].p, (int)s[0],
                       (Py_ssize_t)s[1], (Py_ssize_t)s[2], (Py_ssize_t)s[3]);
            PyObject *fields = Py_BuildValue("((LLLL))", starts[i], packets[i].p.count, s[2] + s[3],
                                             s[2] + packets[i].p.last);
            value = fields ? PyTuple_Type.tp_new((PyTypeObject *)cut_type, fields, NULL) : NULL;
            Py_XDECREF(fields);
        }
        if (value == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, value);
    }
done:
    PyMem_Free(starts);
    PyMem_Free(codes);
    PyMem_Free(packets);
    Py_XDECREF(seq);
    if (out.obj)
        PyBuffer_Release(&out);
    PyBuffer_Release(&src);
    return result;
}

/* ---- the GRO checks ----------------------------------------------------------------------------- */

/* A 1-D contiguous buffer of machine integers (numpy's uint32 rules, intp row orders). */
static int get_ints(PyObject *obj, Py_buffer *view, const char *what, Py_ssize_t itemsize_a, Py_ssize_t itemsize_b)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=')
        f++;
    if (view->ndim != 1 || f[0] == '\0' || f[1] != '\0' || strchr("bBhHiIlLqQnN", f[0]) == NULL
        || (view->itemsize != itemsize_a && view->itemsize != itemsize_b)) {
        PyErr_Format(PyExc_ValueError, "%s: a 1-D array of %zd-byte integers", what, itemsize_a);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline long long int_at(const Py_buffer *view, Py_ssize_t i)
{
    const char *p = (const char *)view->buf + i * view->itemsize;
    if (view->itemsize == 8) {
        int64_t v;
        memcpy(&v, p, 8);
        return v;
    }
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The checks of one table, rows in logical order: logical row i is physical row ``order[i]`` (or i, if
 * ``order`` is NULL), ``lengths[p]`` bytes long, at ``data + p * seg``. Writes differ[rows - 1]
 * (logical rows i and i + 1 break the rule m/s), bad[rows] (a checksum fails) and psh[rows - 1]
 * (TCP PSH on logical row i), each 0 or 1. Every row was checked to lie in its buffer. */
static void check_rows(const uint8_t *data, Py_ssize_t rows, Py_ssize_t seg, Py_ssize_t hl, int proto,
                       const Py_ssize_t *lengths, const Py_ssize_t *order, const uint32_t *m, const uint32_t *s,
                       uint8_t *differ, uint8_t *bads, uint8_t *psh)
{
    Py_ssize_t words = hl / 4;
    uint32_t prev[MAX_HEADERS / 4];
    uint8_t padded[MAX_HEADERS];
    memset(differ, 0, (size_t)(rows - 1));
    memset(psh, 0, (size_t)(rows - 1));
    for (Py_ssize_t i = 0; i < rows; i++) {
        Py_ssize_t p = order ? order[i] : i;
        const uint8_t *row = data + p * seg;
        Py_ssize_t n = lengths[p];
        const uint8_t *h = row; /* the headers; a row shorter than them reads as zero-padded */
        if (n < hl) {
            memset(padded, 0, sizeof padded);
            memcpy(padded, row, (size_t)n);
            h = padded;
        }
        uint64_t ip = be_sum(h, IP_HEADER);
        /* + 0xFFFF (= 0): a row shorter than its IP header has a negative L4 length */
        uint64_t l4 = be_sum(h + 12, 8) + (uint64_t)proto + 0xFFFF + (uint64_t)n - IP_HEADER;
        if (n > IP_HEADER)
            l4 += be_sum(row + IP_HEADER, n - IP_HEADER);
        bads[i] = ip % 0xFFFF || l4 % 0xFFFF || (proto == PROTO_UDP && h[26] == 0 && h[27] == 0);
        for (Py_ssize_t w = 0; w < words; w++) {
            uint32_t v = get32(h + 4 * w);
            if (n != seg) { /* a short row is compared as if it were full */
                if (w == 0)
                    v = (v & 0xFFFF0000u) | (uint32_t)seg;
                else if (w == 6 && proto == PROTO_UDP)
                    v = (v & 0xFFFFu) | (uint32_t)(seg - IP_HEADER) << 16;
            }
            v &= m[w];
            if (i > 0 && (uint32_t)(v - prev[w]) != s[w])
                differ[i - 1] = 1;
            prev[w] = v;
        }
        if (i < rows - 1)
            psh[i] = proto == PROTO_TCP && (h[33] & PSH) != 0;
    }
}


/* The merge rule (``mask`` and ``step``: a uint32 per header word) copied into m and s (a buffer need
 * not be aligned). -1 with ValueError for arrays of another kind or length. */
static int read_rule(PyObject *mask_obj, PyObject *step_obj, Py_ssize_t words, uint32_t *m, uint32_t *s)
{
    Py_buffer mask = {0}, step = {0};
    int rc = -1;
    if (get_ints(mask_obj, &mask, "mask", 4, 4) < 0)
        return -1;
    if (get_ints(step_obj, &step, "step", 4, 4) < 0)
        goto done;
    if (mask.shape[0] != words || step.shape[0] != words) {
        bad("mask and step have a word per header word");
        goto done;
    }
    memcpy(m, mask.buf, (size_t)words * 4);
    memcpy(s, step.buf, (size_t)words * 4);
    rc = 0;
done:
    if (step.obj)
        PyBuffer_Release(&step);
    PyBuffer_Release(&mask);
    return rc;
}

/* The arguments every call over a GRO table shares: ``short`` a dict, rows of ``seg`` bytes with
 * ``hl``-byte headers of ``proto`` that a GRO table can have, and the merge rule ``mask``/``step``
 * copied into m and s. -1 with TypeError or ValueError. */
static int table_args(PyObject *short_rows, long long proto, long long hl, long long seg, PyObject *mask,
                      PyObject *step, uint32_t *m, uint32_t *s)
{
    if (!PyDict_Check(short_rows)) {
        PyErr_SetString(PyExc_TypeError, "short is a dict: row -> length");
        return -1;
    }
    const char *why = proto != PROTO_TCP && proto != PROTO_UDP ? "the protocol is neither TCP nor UDP"
                      : hl % 4 || hl < (proto == PROTO_TCP ? 40 : 28) || hl > MAX_HEADERS ? "bad header length"
                      : seg < hl || seg > MAX_LENGTH || seg % 2 ? "bad row size"
                      : NULL;
    if (why) {
        bad(why);
        return -1;
    }
    return read_rule(mask, step, (Py_ssize_t)hl / 4, m, s);
}

/* The short rows (a dict: physical row -> its length, below ``allowed`` and shorter than ``seg``) into
 * lengths[0..kept), which the caller filled with ``seg``. -1 with an exception. */
static int read_short_rows(PyObject *short_rows, long long allowed, long long seg, Py_ssize_t *lengths, long long kept)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(short_rows, &pos, &key, &value)) {
        long long r, length;
        Py_INCREF(key); /* (borrowed: converting one may run code that drops the other from the dict) */
        Py_INCREF(value);
        int failed = as_int(key, &r, "a short row") < 0 || as_int(value, &length, "a short row's length") < 0;
        Py_DECREF(key);
        Py_DECREF(value);
        if (failed)
            return -1;
        if (r < 0 || r >= allowed || length < 0 || length >= seg) {
            bad("a short row outside the table, or not shorter than a row");
            return -1;
        }
        if (r < kept)
            lengths[r] = (Py_ssize_t)length;
    }
    return 0;
}

PyDoc_STRVAR(check_doc,
"check(buf, base, rows, seg, hl, proto, short, mask, step, order) -> bytearray\n--\n\n"
"The GRO checks of tun.gso_numpy.Checker over a table of ``rows`` rows of ``seg`` bytes at ``base``\n"
"in ``buf`` (IHL 5 headers of ``hl`` bytes; ``short``: physical row -> its length, when shorter).\n"
"``order``: None, or the physical row of each logical row (1-D integers). Returns 3 * rows - 2 bytes\n"
"of 0/1: differ (rows - 1: logical rows i and i + 1 break the rule ``mask``/``step``), bad (rows:\n"
"a checksum fails) and psh (rows - 1: TCP PSH). ValueError for any row outside ``buf``.");

static PyObject *check(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (arity_wrong(nargs, 10, "check(buf, base, rows, seg, hl, proto, short, mask, step, order)"))
        return NULL;
    long long base, rows, seg, hl, proto;
    if (as_int(args[1], &base, "base") < 0 || as_int(args[2], &rows, "rows") < 0 || as_int(args[3], &seg, "seg") < 0
        || as_int(args[4], &hl, "hl") < 0 || as_int(args[5], &proto, "proto") < 0)
        return NULL;
    PyObject *short_rows = args[6];
    uint32_t m[MAX_HEADERS / 4], s[MAX_HEADERS / 4];
    if (table_args(short_rows, proto, hl, seg, args[7], args[8], m, s) < 0)
        return NULL;
    if (rows < 1 || base < 0)
        return bad("bad table");
    Py_buffer buf = {0}, order = {0};
    Py_ssize_t stack[ON_STACK], *lengths = stack; /* per physical row */
    PyObject *result = NULL;
    int ordered = args[9] != Py_None;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    long long in_buf = base > buf.len ? 0 : (buf.len - base) / seg; /* whole rows after base */
    long long physical = rows; /* rows a length is kept for: up to the last one order names */
    if (ordered) {
        if (get_ints(args[9], &order, "order", 8, 4) < 0)
            goto done;
        if (order.shape[0] != rows) {
            bad("order has one entry per row");
            goto done;
        }
        physical = 0;
        for (Py_ssize_t i = 0; i < rows; i++) {
            long long p = int_at(&order, i);
            if (p < 0 || p >= in_buf) {
                bad("order names a row outside the buffer");
                goto done;
            }
            if (p >= physical)
                physical = p + 1;
        }
    } else if (rows > in_buf) {
        bad("the table does not fit the buffer");
        goto done;
    }
    if (physical > ON_STACK && (lengths = PyMem_New(Py_ssize_t, (size_t)physical)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t p = 0; p < physical; p++)
        lengths[p] = (Py_ssize_t)seg;
    if (read_short_rows(short_rows, ordered ? in_buf : rows, seg, lengths, physical) < 0)
        goto done;
    result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(3 * rows - 2));
    if (result == NULL)
        goto done;
    {
        uint8_t *differ = (uint8_t *)PyByteArray_AS_STRING(result);
        Py_ssize_t stack_order[ON_STACK], *rows_in = NULL;
        if (ordered) {
            rows_in = rows > ON_STACK ? PyMem_New(Py_ssize_t, (size_t)rows) : stack_order;
            if (rows_in == NULL) {
                Py_CLEAR(result);
                PyErr_NoMemory();
                goto done;
            }
            for (Py_ssize_t i = 0; i < rows; i++) {
                Py_ssize_t p = (Py_ssize_t)int_at(&order, i);
                if (p < 0 || p >= physical) { /* checked above, but code run since (an __index__) may change it */
                    if (rows_in != stack_order)
                        PyMem_Free(rows_in);
                    Py_CLEAR(result);
                    bad("order names a row outside the buffer");
                    goto done;
                }
                rows_in[i] = p;
            }
        }
        check_rows((const uint8_t *)buf.buf + base, (Py_ssize_t)rows, (Py_ssize_t)seg, (Py_ssize_t)hl, (int)proto,
                   lengths, rows_in, m, s, differ, differ + rows - 1, differ + 2 * rows - 1);
        if (rows_in != stack_order)
            PyMem_Free(rows_in);
    }
done:
    if (lengths != stack)
        PyMem_Free(lengths);
    if (order.obj)
        PyBuffer_Release(&order);
    PyBuffer_Release(&buf);
    return result;
}

/* ---- the GRO plan ------------------------------------------------------------------------------- */

/* A flow as the plan groups rows: addresses, ports and protocol (exact, not a hash: rows of two
 * flows are never grouped together), and who sent the batch. */
typedef struct {
    uint8_t tuple[13]; /* source and destination address, ports (IPv4 bytes 12..23), protocol */
    long long sender;
} flow_key;

static uint64_t key_hash(const flow_key *k)
{
    uint64_t h = 0xcbf29ce484222325u ^ (uint64_t)k->sender;
    for (int i = 0; i < 13; i++)
        h = (h ^ k->tuple[i]) * 0x100000001b3u;
    return h ^ h >> 29;
}

/* A run's first row may head a merged write (tun.coalesce.Coalescer._head_ok): IHL 5, the row's size
 * as its total length, not a fragment; for TCP, flags exactly ACK and the table's header length; for
 * UDP, the UDP length. Later rows match it by the merge rule. */
static int head_ok(const uint8_t *h, Py_ssize_t seg, Py_ssize_t hl, int proto)
{
    if (h[0] != 0x45 || h[9] != proto || (Py_ssize_t)get16(h + 2) != seg || (get16(h + 6) & 0x3FFF))
        return 0;
    if (proto == PROTO_UDP)
        return (Py_ssize_t)get16(h + 24) == seg - IP_HEADER;
    return h[33] == 0x10 && IP_HEADER + ((h[32] >> 4) << 2) == hl;
}

/* A GRO batch's short last row that may not end a run: its total length (UDP length) disagrees with
 * its size, or it has no payload (tun.coalesce._short_row_wrong). */
static int short_row_wrong(const uint8_t *h, Py_ssize_t length, Py_ssize_t hl, int proto)
{
    return length <= hl || (Py_ssize_t)get16(h + 2) != length
           || (proto == PROTO_UDP && (Py_ssize_t)get16(h + 24) != length - IP_HEADER);
}

/* Append the run (a, b) to ``runs``; -1 with an exception. */
static int append_run(PyObject *runs, Py_ssize_t a, Py_ssize_t b)
{
    PyObject *run = Py_BuildValue("(nn)", a, b);
    int rc = run == NULL ? -1 : PyList_Append(runs, run);
    Py_XDECREF(run);
    return rc;
}

PyDoc_STRVAR(plan_doc,
"plan(buf, base, seg, hl, proto, short, counts, senders, mask, step, most)\n"
"    -> (runs, order, flows, breaks, refused)\n--\n\n"
"tun.coalesce.Coalescer.plan's work after the table's kind is known, in one pass: a table of rows of\n"
"``seg`` bytes at ``base`` in ``buf`` (``counts[j]`` rows from batch j, sent by ``senders[j]``, or all by\n"
"one sender if None; ``short``: physical row -> its length, when shorter) grouped by flow (addresses,\n"
"ports, protocol and sender, exactly; flows in the order they first appear, each flow's rows in the\n"
"order they came), checked as tun.gso_c.check checks, and cut into runs of at most ``most`` rows.\n"
"``order``: the physical row of each logical row, or None if every row is where it lies. ValueError\n"
"for a table outside ``buf`` or arguments of the wrong shape.");

static PyObject *plan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (arity_wrong(nargs, 11, "plan(buf, base, seg, hl, proto, short, counts, senders, mask, step, most)"))
        return NULL;
    long long base, seg, hl, proto, most;
    if (as_int(args[1], &base, "base") < 0 || as_int(args[2], &seg, "seg") < 0 || as_int(args[3], &hl, "hl") < 0
        || as_int(args[4], &proto, "proto") < 0 || as_int(args[10], &most, "most") < 0)
        return NULL;
    uint32_t m[MAX_HEADERS / 4], st[MAX_HEADERS / 4];
    if (table_args(args[5], proto, hl, seg, args[8], args[9], m, st) < 0)
        return NULL;
    if (seg == hl) /* rows with no payload have nothing to merge */
        return bad("bad row size");
    if (base < 0 || most < 1)
        return bad("bad table");
    Py_buffer buf = {0};
    PyObject *counts = NULL, *senders = NULL, *result = NULL, *runs = NULL, *order_list = NULL;
    void *block = NULL;
    long long *batch = NULL;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    /* Tuples of our own: converting an item may run Python code (__index__) that changes the caller's. */
    if ((counts = PySequence_Tuple(args[6])) == NULL)
        goto done;
    if (args[7] != Py_None && (senders = PySequence_Tuple(args[7])) == NULL)
        goto done;
    Py_ssize_t batches = PyTuple_GET_SIZE(counts);
    if (senders && PyTuple_GET_SIZE(senders) != batches) {
        bad("senders has one entry per batch");
        goto done;
    }
    long long in_buf = base > buf.len ? 0 : (buf.len - base) / seg; /* whole rows after base */
    long long rows = 0;
    if ((batch = PyMem_New(long long, 2 * (size_t)batches + 1)) == NULL) { /* rows and sender, per batch */
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < batches; j++) {
        long long n, who = 0;
        if (as_int(PyTuple_GET_ITEM(counts, j), &n, "a batch's row count") < 0)
            goto done;
        if (senders && as_int(PyTuple_GET_ITEM(senders, j), &who, "a sender") < 0)
            goto done;
        if (n < 0 || n > in_buf - rows) {
            bad("the table does not fit the buffer");
            goto done;
        }
        rows += n;
        batch[2 * j] = n;
        batch[2 * j + 1] = who;
    }
    if (rows < 1) {
        bad("an empty table");
        goto done;
    }
    /* One block for the per-row arrays and the flow table (a power of two, at least twice the rows). */
    Py_ssize_t n_rows = (Py_ssize_t)rows, slots = 2;
    while (slots < 2 * n_rows)
        slots <<= 1;
    size_t bytes = (size_t)n_rows * (5 * sizeof(Py_ssize_t) + 4 + sizeof(flow_key)) + (size_t)slots * sizeof(Py_ssize_t);
    if ((block = PyMem_Malloc(bytes)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t *lengths = (Py_ssize_t *)block, *flow_of = lengths + n_rows, *order = flow_of + n_rows,
               *position = order + n_rows, *flow_rows = position + n_rows, *table = flow_rows + n_rows;
    flow_key *keys = (flow_key *)(table + slots);
    uint8_t *differ = (uint8_t *)(keys + n_rows), *bads = differ + n_rows, *psh = bads + n_rows,
            *fixed = psh + n_rows;
    for (Py_ssize_t p = 0; p < n_rows; p++)
        lengths[p] = (Py_ssize_t)seg;
    if (read_short_rows(args[5], rows, seg, lengths, rows) < 0)
        goto done;
    const uint8_t *data = (const uint8_t *)buf.buf + base;
    /* Group: each row's flow, numbered in the order flows first appear. */
    Py_ssize_t flows = 0;
    for (Py_ssize_t s = 0; s < slots; s++)
        table[s] = -1;
    {
        Py_ssize_t p = 0;
        for (Py_ssize_t j = 0; j < batches; j++) {
            long long n = batch[2 * j], who = batch[2 * j + 1];
            for (long long k = 0; k < n; k++, p++) {
                const uint8_t *row = data + p * seg;
                Py_ssize_t length = lengths[p];
                flow_key key;
                memset(&key, 0, sizeof key); /* a row too short for its ports keys as zero past its end */
                for (int b = 0; b < 12; b++)
                    key.tuple[b] = 12 + b < length ? row[12 + b] : 0;
                key.tuple[12] = 9 < length ? row[9] : 0;
                key.sender = who;
                Py_ssize_t s = (Py_ssize_t)(key_hash(&key) & (uint64_t)(slots - 1));
                while (table[s] >= 0 && (memcmp(keys[table[s]].tuple, key.tuple, 13) || keys[table[s]].sender != who))
                    s = (s + 1) & (slots - 1);
                if (table[s] < 0) {
                    table[s] = flows;
                    keys[flows] = key;
                    flow_rows[flows++] = 0;
                }
                flow_of[p] = table[s];
                flow_rows[table[s]]++;
            }
        }
    }
    /* Order: flow by flow, each flow's rows as they came (a counting sort); its ends are fixed cuts. */
    memset(fixed, 0, (size_t)n_rows);
    {
        Py_ssize_t at = 0;
        for (Py_ssize_t f = 0; f < flows; f++) { /* flow_rows[f] becomes the flow's next logical row */
            Py_ssize_t count = flow_rows[f];
            flow_rows[f] = at;
            at += count;
            fixed[at - 1] = 1;
        }
        for (Py_ssize_t p = 0; p < n_rows; p++) {
            Py_ssize_t i = flow_rows[flow_of[p]]++;
            order[i] = p;
            position[p] = i;
        }
    }
    int identity = 1;
    for (Py_ssize_t i = 0; i < n_rows && identity; i++)
        identity = order[i] == i;
    check_rows(data, n_rows, (Py_ssize_t)seg, (Py_ssize_t)hl, (int)proto, lengths, identity ? NULL : order, m, st,
               differ, bads, psh);
    for (Py_ssize_t r = 0; r < n_rows; r++) /* a short row ends its run; a wrong one is refused */
        if (lengths[r] < seg) {
            fixed[position[r]] = 1;
            bads[position[r]] |= (uint8_t)short_row_wrong(data + r * seg, lengths[r], (Py_ssize_t)hl, (int)proto);
        }
    /* Cuts: after a flow's end or a short row (fixed), a broken rule, PSH, or a row failing its checks
     * (which ends the run before it too). */
    Py_ssize_t breaks = 0, refused = 0;
    for (Py_ssize_t i = 0; i < n_rows; i++)
        refused += bads[i];
    for (Py_ssize_t i = 0; i < n_rows - 1; i++) {
        if (fixed[i])
            differ[i] = 0;
        breaks += differ[i] && !(bads[i] || bads[i + 1]);
        differ[i] |= psh[i] | bads[i] | bads[i + 1] | fixed[i]; /* now: a cut after logical row i */
    }
    if ((runs = PyList_New(0)) == NULL)
        goto done;
    {
        Py_ssize_t start = 0;
        for (Py_ssize_t end = 0; end < n_rows; end++) {
            if (end < n_rows - 1 && !differ[end])
                continue;
            for (Py_ssize_t c = start; c <= end; c += (Py_ssize_t)most) { /* at most ``most`` rows a write */
                Py_ssize_t d = c + (Py_ssize_t)most < end + 1 ? c + (Py_ssize_t)most : end + 1;
                Py_ssize_t first = identity ? c : order[c];
                if (d - c > 1 && head_ok(data + first * seg, (Py_ssize_t)seg, (Py_ssize_t)hl, (int)proto)) {
                    if (append_run(runs, c, d) < 0)
                        goto done;
                    continue;
                }
                for (Py_ssize_t i = c; i < d; i++) /* singles */
                    if (append_run(runs, i, i + 1) < 0)
                        goto done;
            }
            start = end + 1;
        }
    }
    if (identity) {
        order_list = Py_NewRef(Py_None);
    } else {
        if ((order_list = PyList_New(n_rows)) == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < n_rows; i++) {
            PyObject *v = PyLong_FromSsize_t(order[i]);
            if (v == NULL)
                goto done;
            PyList_SET_ITEM(order_list, i, v);
        }
    }
    result = Py_BuildValue("(OOnnn)", runs, order_list, flows, breaks, refused);
done:
    Py_XDECREF(order_list);
    Py_XDECREF(runs);
    PyMem_Free(block);
    PyMem_Free(batch);
    Py_XDECREF(senders);
    Py_XDECREF(counts);
    PyBuffer_Release(&buf);
    return result;
}

/* ---- a run merged into one TUN write ------------------------------------------------------------ */

/* A virtio_net_hdr in the host's byte order (the TUN's, without TUNSETVNETLE/BE), as tun/vnet.py packs it. */
static void put_vnet(uint8_t *v, unsigned gso_type, unsigned hdr_len, unsigned gso_size, unsigned csum_start,
                     unsigned csum_offset)
{
    uint16_t fields[4] = {(uint16_t)hdr_len, (uint16_t)gso_size, (uint16_t)csum_start, (uint16_t)csum_offset};
    v[0] = VNET_NEEDS_CSUM;
    v[1] = (uint8_t)gso_type;
    memcpy(v + 2, fields, sizeof fields);
}

/* The physical row of logical row i: order[i] (a list of ints), or i. -1 with an exception set. */
static Py_ssize_t physical_row(PyObject *order, Py_ssize_t i)
{
    if (order == Py_None)
        return i;
    if (i < 0 || i >= PyList_GET_SIZE(order)) {
        bad("a run outside the plan's order");
        return -1;
    }
    Py_ssize_t r = PyLong_AsSsize_t(PyList_GET_ITEM(order, i));
    if (r < 0 && !PyErr_Occurred())
        bad("a negative row in the plan's order");
    return r;
}

PyDoc_STRVAR(merge_doc,
"merge(buf, views, zero, order, a, b, seg, hl, proto, tail) -> list\n--\n\n"
"tun.coalesce.Plan.merge's iovec for logical rows a..b-1 of a table of ``seg``-byte rows, built in\n"
"one call: a bytes object (the virtio_net_hdr and the first row's headers, fixed up for the total\n"
"length, the L4 checksum field holding the pseudo-header sum, TCP flags as on the last row), then\n"
"each row's payload view, ``views[zero + r]`` (row r's payload, the table starting at row ``zero``\n"
"of ``buf``), the last one cut to ``tail`` bytes of row. ``order``: the plan's list, or None.\n"
"ValueError for rows outside ``buf`` or ``views``.");

static PyObject *merge(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (arity_wrong(nargs, 10, "merge(buf, views, zero, order, a, b, seg, hl, proto, tail)"))
        return NULL;
    long long zero, a, b, seg, hl, proto, tail;
    if (as_int(args[2], &zero, "zero") < 0 || as_int(args[4], &a, "a") < 0 || as_int(args[5], &b, "b") < 0
        || as_int(args[6], &seg, "seg") < 0 || as_int(args[7], &hl, "hl") < 0 || as_int(args[8], &proto, "proto") < 0
        || as_int(args[9], &tail, "tail") < 0)
        return NULL;
    PyObject *views = args[1], *order = args[3];
    if (!PyList_Check(views) || (order != Py_None && !PyList_Check(order))) {
        PyErr_SetString(PyExc_TypeError, "views is a list; order a list or None");
        return NULL;
    }
    if (proto != PROTO_TCP && proto != PROTO_UDP)
        return bad("the protocol is neither TCP nor UDP");
    if (hl < IP_HEADER + (proto == PROTO_TCP ? 20 : 8) || hl > MAX_HEADERS || seg <= hl || seg > MAX_LENGTH)
        return bad("bad header length or row size");
    if (b - a < 2 || a < 0 || zero < 0 || tail <= hl || tail > seg)
        return bad("a run is two rows or more, its last row longer than its headers");
    long long total = (b - a - 1) * (seg - hl) + tail;
    if (total > MAX_LENGTH)
        return bad("a merged packet longer than an IPv4 packet");
    Py_ssize_t first = physical_row(order, (Py_ssize_t)a), last = physical_row(order, (Py_ssize_t)b - 1);
    if (first < 0 || last < 0)
        return NULL;
    Py_ssize_t n_views = PyList_GET_SIZE(views);
    if (zero + first >= n_views || zero + last >= n_views)
        return bad("a row outside the views");
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *iov = NULL, *head = NULL;
    const uint8_t *data = (const uint8_t *)buf.buf;
    if ((zero + (first > last ? first : last) + 1) * seg > buf.len) { /* the rows whose headers are read */
        bad("a row outside the buffer");
        goto done;
    }
    if ((head = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + (Py_ssize_t)hl)) == NULL)
        goto done;
    uint8_t *v = (uint8_t *)PyBytes_AS_STRING(head), *h = v + VNET_HDR_LEN;
    memcpy(h, data + (zero + first) * seg, (size_t)hl);
    /* The first row's header checksum is valid (the plan checked it; inbound may have patched its
     * TTL), so the total length going from seg to total is an RFC 1624 update: HC' = ~(~HC + ~seg + total). */
    uint32_t x = (get16(h + 10) ^ 0xFFFFu) + ((unsigned)seg ^ 0xFFFFu) + (uint32_t)total;
    x = (x & 0xFFFF) + (x >> 16);
    x = (x & 0xFFFF) + (x >> 16);
    put16(h + 2, (unsigned)total);
    put16(h + 10, x ^ 0xFFFFu);
    unsigned pseudo = (unsigned)((be_sum(h + 12, 8) + (uint64_t)proto + (uint64_t)total - IP_HEADER) % 0xFFFF);
    if (proto == PROTO_UDP) {
        put16(h + IP_HEADER + 4, (unsigned)(total - IP_HEADER));
        put16(h + IP_HEADER + 6, pseudo);
        put_vnet(v, VNET_GSO_UDP_L4, (unsigned)hl, (unsigned)(seg - hl), IP_HEADER, 6);
    } else {
        h[IP_HEADER + 13] = data[(zero + last) * seg + IP_HEADER + 13]; /* PSH as on the last row */
        put16(h + IP_HEADER + 16, pseudo);
        put_vnet(v, VNET_GSO_TCPV4, (unsigned)hl, (unsigned)(seg - hl), IP_HEADER, 16);
    }
    if ((iov = PyList_New((Py_ssize_t)(b - a + 1))) == NULL)
        goto done;
    PyList_SET_ITEM(iov, 0, head);
    head = NULL;
    for (Py_ssize_t i = (Py_ssize_t)a; i < (Py_ssize_t)b; i++) {
        Py_ssize_t r = i == a ? first : i == b - 1 ? last : physical_row(order, i);
        if (r < 0 || zero + r >= n_views) {
            if (!PyErr_Occurred())
                bad("a row outside the views");
            Py_CLEAR(iov);
            goto done;
        }
        PyObject *view = PyList_GET_ITEM(views, (Py_ssize_t)zero + r);
        if (i == b - 1 && tail < seg)
            view = PySequence_GetSlice(view, 0, (Py_ssize_t)(tail - hl));
        else
            Py_INCREF(view);
        if (view == NULL) {
            Py_CLEAR(iov);
            goto done;
        }
        PyList_SET_ITEM(iov, i - (Py_ssize_t)a + 1, view);
    }
done:
    Py_XDECREF(head);
    PyBuffer_Release(&buf);
    return iov;
}

static PyMethodDef methods[] = {
    {"cut", (PyCFunction)(void (*)(void))cut, METH_FASTCALL, cut_doc},
    {"cut_many", (PyCFunction)(void (*)(void))cut_many, METH_FASTCALL, cut_many_doc},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL, check_doc},
    {"plan", (PyCFunction)(void (*)(void))plan, METH_FASTCALL, plan_doc},
    {"merge", (PyCFunction)(void (*)(void))merge, METH_FASTCALL, merge_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tun._gso_c",
    .m_doc = "The GSO cut and the GRO checks as C loops (see tun/_gso_c.c; tun.gso_c wraps the checks).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__gso_c(void) { return PyModule_Create(&module); }
