/* The lone packet's whole pass in C: one call per wake-up that reads, decides and sends (or receives,
 * decides and writes), registered as the event loop's reader callback, so that a sparse packet runs
 * no Python bytecode at all (docs/latency.md: after each sleep the interpreter's code and data are
 * cold, and a Python pass cost ~10x what it costs hot).
 *
 * What it does is udpflannel.forward's decision, exactly (tests/test_lone.py compares them under
 * hypothesis), for the ordinary packet only: a valid IPv4 packet to a leased subnet on the way out; a
 * well-formed datagram from a current peer, with a source in that peer's subnets and valid header and
 * transport checksums, on the way in. Everything else is handed to the Python mover *before* the
 * packet is touched or counted, with the rest of the wake-up: drops, ICMP, the packet trace,
 * super-packets and GRO batches, a full socket or TUN, errors. Python keeps every rule; C only takes
 * the common case's cost away.
 *
 * The counters are the engine's own (udpflannel.counters.Counters): C adds to their slots at the end of
 * each pass and before every hand-over, so Python never sees them behind. The route table is compiled
 * into sorted arrays (:class:`Routes`, one per prefix length, longest first: a binary search per
 * length) each time the RouteTable's ``version`` changes.
 *
 * Byte order: packet fields are read one byte at a time in network order, checksums summed over native
 * words and swapped once (tun/_csum.h); the virtio_net_hdr's u16s are in the host's order (the TUN's
 * legacy virtio order), read through memcpy. No unaligned loads, nothing architecture-specific.
 * Every syscall here is non-blocking, so the GIL is kept.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../tun/_csum.h"
#include "../tun/_netorder.h"
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PROTO_ICMP 1
#define PROTO_TCP 6
#define PROTO_UDP 17
#define VNET_HDR_LEN 10
#define VNET_NEEDS_CSUM 1
#define MAX_IP_PACKET 0xFFFF
#define CONTROL_ROOM 64 /* >= what the caller asks for (CMSG_SPACE(4) for UDP_GRO) */

static inline unsigned host16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ---------------------------------------------------------------------------------------------------
 * The route table, compiled
 */

typedef struct {
    uint32_t ip; /* host order */
    unsigned port;
    struct sockaddr_in addr;
    PyObject *tuple; /* the NextHop the Python side uses, ("10.0.0.2", 8285) */
} Hop;

typedef struct {
    int shift; /* 32 - prefix length */
    Py_ssize_t count;
    uint32_t *keys; /* network numbers shifted right by ``shift``, ascending */
    Py_ssize_t *hops; /* index into Routes.hops, beside each key */
} Level;

typedef struct {
    PyObject_HEAD
    Py_ssize_t nhops;
    Hop *hops; /* sorted by (ip, port): found by binary search for a receive's source */
    int nlevels;
    Level levels[33]; /* longest prefix first */
} Routes;

static inline uint32_t key_of(uint32_t addr, int shift) { return shift >= 32 ? 0 : addr >> shift; }

static Py_ssize_t level_find(const Level *level, uint32_t key)
{
    Py_ssize_t lo = 0, hi = level->count;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (level->keys[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < level->count && level->keys[lo] == key ? lo : -1;
}

/* Longest-prefix match: the hop index for ``dst``, or -1. */
static Py_ssize_t routes_lookup(const Routes *r, uint32_t dst)
{
    for (int i = 0; i < r->nlevels; i++) {
        const Level *level = &r->levels[i];
        Py_ssize_t at = level_find(level, key_of(dst, level->shift));
        if (at >= 0)
            return level->hops[at];
    }
    return -1;
}

/* Whether ``src`` lies in one of the subnets routed to hop ``peer`` (RouteTable.source_check == FORWARD). */
static int routes_source_ok(const Routes *r, Py_ssize_t peer, uint32_t src)
{
    for (int i = 0; i < r->nlevels; i++) {
        const Level *level = &r->levels[i];
        Py_ssize_t at = level_find(level, key_of(src, level->shift));
        if (at >= 0 && level->hops[at] == peer)
            return 1;
    }
    return 0;
}

static Py_ssize_t routes_find_peer(const Routes *r, uint32_t ip, unsigned port)
{
    Py_ssize_t lo = 0, hi = r->nhops;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        const Hop *h = &r->hops[mid];
        if (h->ip < ip || (h->ip == ip && h->port < port))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < r->nhops && r->hops[lo].ip == ip && r->hops[lo].port == port ? lo : -1;
}

typedef struct {
    uint32_t key;
    int plen;
    Py_ssize_t order;
    Py_ssize_t hop;
} Entry;

static int entry_cmp(const void *a, const void *b)
{
    const Entry *x = a, *y = b;
    if (x->plen != y->plen)
        return x->plen > y->plen ? -1 : 1; /* longest prefix first */
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static int hop_cmp(const void *a, const void *b)
{
    const Hop *x = a, *y = b;
    if (x->ip != y->ip)
        return x->ip < y->ip ? -1 : 1;
    return x->port < y->port ? -1 : x->port > y->port;
}

static void routes_clear(Routes *r)
{
    for (Py_ssize_t i = 0; i < r->nhops; i++)
        Py_XDECREF(r->hops[i].tuple);
    PyMem_Free(r->hops);
    r->hops = NULL;
    r->nhops = 0;
    for (int i = 0; i < r->nlevels; i++) {
        PyMem_Free(r->levels[i].keys);
        PyMem_Free(r->levels[i].hops);
    }
    r->nlevels = 0;
}

static void routes_dealloc(Routes *r)
{
    routes_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* A next hop ``(ip, port)`` as normalize_next_hop makes it: a dotted IPv4 string and a port. */
static int parse_hop(PyObject *tuple, Hop *out)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(tuple, 0))) {
        PyErr_SetString(PyExc_ValueError, "a next hop must be an (ip, port) tuple with the ip as a string");
        return -1;
    }
    const char *text = PyUnicode_AsUTF8(PyTuple_GET_ITEM(tuple, 0));
    if (text == NULL)
        return -1;
    struct in_addr in;
    if (inet_pton(AF_INET, text, &in) != 1) {
        PyErr_Format(PyExc_ValueError, "next hop address is not dotted IPv4: %s", text);
        return -1;
    }
    long port = PyLong_AsLong(PyTuple_GET_ITEM(tuple, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "next hop port out of range: %ld", port);
        return -1;
    }
    memset(out, 0, sizeof *out);
    out->ip = ntohl(in.s_addr);
    out->port = (unsigned)port;
    out->addr.sin_family = AF_INET;
    out->addr.sin_addr = in;
    out->addr.sin_port = htons((uint16_t)port);
    out->tuple = tuple;
    return 0;
}

static int routes_build(Routes *r, PyObject *entries)
{
    PyObject *seq = PySequence_Fast(entries, "Routes() takes a sequence of (network, prefixlen, next hop)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Entry *table = PyMem_Calloc(n ? n : 1, sizeof(Entry));
    Hop *hops = PyMem_Calloc(n ? n : 1, sizeof(Hop));
    int status = -1;
    if (table == NULL || hops == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_ValueError, "each route must be a (network, prefixlen, next hop) tuple");
            goto done;
        }
        unsigned long long net = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (net == (unsigned long long)-1 && PyErr_Occurred())
            goto done;
        long plen = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
        if (plen == -1 && PyErr_Occurred())
            goto done;
        if (net > 0xFFFFFFFFull || plen < 0 || plen > 32) {
            PyErr_SetString(PyExc_ValueError, "a route's network must be a u32 and its prefix length 0..32");
            goto done;
        }
        if (parse_hop(PyTuple_GET_ITEM(item, 2), &hops[i]) < 0)
            goto done;
        table[i].key = key_of((uint32_t)net, 32 - (int)plen);
        table[i].plen = (int)plen;
        table[i].order = i;
    }
    /* the distinct hops, sorted; each entry points at its own */
    Hop *sorted = PyMem_Calloc(n ? n : 1, sizeof(Hop));
    if (sorted == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(sorted, hops, (size_t)n * sizeof(Hop));
    qsort(sorted, (size_t)n, sizeof(Hop), hop_cmp);
    Py_ssize_t distinct = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (distinct == 0 || hop_cmp(&sorted[distinct - 1], &sorted[i]) != 0)
            sorted[distinct++] = sorted[i];
    r->hops = sorted;
    for (Py_ssize_t i = 0; i < distinct; i++)
        Py_INCREF(sorted[i].tuple);
    r->nhops = distinct;
    for (Py_ssize_t i = 0; i < n; i++)
        table[i].hop = routes_find_peer(r, hops[i].ip, hops[i].port);
    /* one level per prefix length; of two routes for one subnet the later wins, as RouteTable.set */
    qsort(table, (size_t)n, sizeof(Entry), entry_cmp);
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t end = i;
        while (end < n && table[end].plen == table[i].plen)
            end++;
        Level *level = &r->levels[r->nlevels++];
        level->shift = 32 - table[i].plen;
        level->keys = PyMem_Calloc((size_t)(end - i), sizeof(uint32_t));
        level->hops = PyMem_Calloc((size_t)(end - i), sizeof(Py_ssize_t));
        if (level->keys == NULL || level->hops == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t k = i; k < end; k++) {
            if (k + 1 < end && table[k + 1].key == table[k].key)
                continue; /* a later route for the same subnet follows */
            level->keys[level->count] = table[k].key;
            level->hops[level->count++] = table[k].hop;
        }
        i = end;
    }
    status = 0;
done:
    PyMem_Free(table);
    PyMem_Free(hops);
    Py_DECREF(seq);
    if (status < 0)
        routes_clear(r);
    return status;
}

static PyObject *routes_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *entries;
    static char *names[] = {"entries", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O:Routes", names, &entries))
        return NULL;
    Routes *r = (Routes *)type->tp_alloc(type, 0);
    if (r == NULL)
        return NULL;
    if (routes_build(r, entries) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static PyObject *routes_lookup_py(Routes *r, PyObject *arg)
{
    unsigned long long dst = PyLong_AsUnsignedLongLong(arg);
    if (dst == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (dst > 0xFFFFFFFFull)
        return PyErr_Format(PyExc_ValueError, "not an IPv4 address: %llu", dst);
    Py_ssize_t hop = routes_lookup(r, (uint32_t)dst);
    if (hop < 0)
        Py_RETURN_NONE;
    return Py_NewRef(r->hops[hop].tuple);
}

static Py_ssize_t routes_len(Routes *r)
{
    Py_ssize_t total = 0;
    for (int i = 0; i < r->nlevels; i++)
        total += r->levels[i].count;
    return total;
}

static PyMethodDef routes_methods[] = {
    {"lookup", (PyCFunction)routes_lookup_py, METH_O, "lookup(dst) -> the next hop for a host-order u32, or None"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods routes_as_sequence = {.sq_length = (lenfunc)routes_len};

static PyTypeObject RoutesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "udpflannel._lone.Routes",
    .tp_basicsize = sizeof(Routes),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Routes(entries): a RouteTable compiled for the C pass; entries are (network, prefixlen, (ip, port)).",
    .tp_new = routes_new,
    .tp_dealloc = (destructor)routes_dealloc,
    .tp_methods = routes_methods,
    .tp_as_sequence = &routes_as_sequence,
};

/* ---------------------------------------------------------------------------------------------------
 * The decisions: udpflannel.forward.outbound and inbound, for the packet they would FORWARD
 */

/* packet.check_ipv4 == FORWARD */
static int ipv4_ok(const uint8_t *b, Py_ssize_t n)
{
    if (n < 20)
        return 0;
    unsigned first = b[0];
    return first >= 0x45 && first <= 0x4F && (Py_ssize_t)get16(b + 2) == n && (Py_ssize_t)((first & 0x0F) << 2) <= n;
}

/* packet.decrement_ttl, once the TTL is known to be > 1: RFC 1624 patch, 0xFFFF stored as 0 */
static void ttl_decrement(uint8_t *b)
{
    b[8]--;
    unsigned check = get16(b + 10) + 0x0100;
    check = (check & 0xFFFF) + (check >> 16);
    put16(b + 10, check == 0xFFFF ? 0 : check);
}

/* The shortest header of each checked transport: packet._TRANSPORT_HEADER */
static Py_ssize_t transport_header(unsigned proto)
{
    return proto == PROTO_TCP ? 20 : proto == PROTO_ICMP || proto == PROTO_UDP ? 8 : 0;
}

/* packet.check_transport == FORWARD (after ipv4_ok and a valid header checksum) */
static int transport_ok(const uint8_t *b, Py_ssize_t n)
{
    Py_ssize_t ihl = (b[0] & 0x0F) << 2, length = n - ihl;
    unsigned proto = b[9], fragment = get16(b + 6) & 0x3FFF;
    if (fragment) {
        if ((Py_ssize_t)((fragment & 0x1FFF) << 3) + n > 0xFFFF)
            return 0;
        return !(fragment == 0x2000 && length < transport_header(proto));
    }
    const uint8_t *l4 = b + ihl;
    if (proto == PROTO_TCP) {
        if (length < 20 || (l4[12] >> 4) < 5 || (l4[12] >> 4) > (length >> 2))
            return 0;
    } else if (proto == PROTO_UDP) {
        if (length < 8 || (Py_ssize_t)get16(l4 + 4) != length)
            return 0;
        if (l4[6] == 0 && l4[7] == 0)
            return 1;
    } else if (proto == PROTO_ICMP) {
        if (length < 8)
            return 0;
    } else {
        return 1;
    }
    uint64_t sum = be_sum(l4, length);
    if (proto != PROTO_ICMP)
        sum += be_sum(b + 12, 8) + proto + (uint64_t)length;
    return sum != 0 && sum % 0xFFFF == 0;
}

/* outbound() == (FORWARD, hop): the hop's index, the buffer untouched (the caller decrements the TTL) */
static Py_ssize_t decide_out(const Routes *r, const uint8_t *b, Py_ssize_t n)
{
    if (!ipv4_ok(b, n) || b[8] <= 1)
        return -1;
    return routes_lookup(r, get32(b + 16));
}

/* inbound() == FORWARD for a datagram from hop ``peer`` (-1: no current peer), the buffer untouched */
static int decide_in(const Routes *r, const uint8_t *b, Py_ssize_t n, Py_ssize_t peer, long tun_mtu, int check_source)
{
    if (peer < 0 || n > tun_mtu || !ipv4_ok(b, n) || b[8] <= 1)
        return 0;
    if (check_source && !routes_source_ok(r, peer, get32(b + 12)))
        return 0;
    if (be_sum(b, (b[0] & 0x0F) << 2) % 0xFFFF != 0)
        return 0;
    return transport_ok(b, n);
}

/* vnet.complete_checksum's bounds: whether a NEEDS_CSUM packet's offsets fit it */
static int csum_fits(Py_ssize_t n, unsigned start, unsigned offset)
{
    return start >= 20 && (Py_ssize_t)(start + offset) + 2 <= n;
}

static void csum_complete(uint8_t *b, Py_ssize_t n, unsigned start, unsigned offset)
{
    uint64_t sum = be_sum(b + start, n - start);
    put16(b + start + offset, 0xFFFF - (unsigned)(sum % 0xFFFF));
}

/* ---------------------------------------------------------------------------------------------------
 * The decisions as functions, for the tests (and for anyone reading along with udpflannel.forward)
 */

static int writable_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t n)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (n < 0 || n > view->len) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "n must lie within the buffer");
        return -1;
    }
    return 0;
}

static PyObject *outbound_py(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *buf;
    Py_ssize_t n;
    Routes *r;
    if (!PyArg_ParseTuple(args, "OnO!:outbound", &buf, &n, &RoutesType, &r))
        return NULL;
    Py_buffer view;
    if (writable_buffer(buf, &view, n) < 0)
        return NULL;
    uint8_t *b = view.buf;
    Py_ssize_t hop = decide_out(r, b, n);
    PyObject *result = Py_None;
    if (hop >= 0) {
        ttl_decrement(b);
        result = r->hops[hop].tuple;
    }
    PyBuffer_Release(&view);
    return Py_NewRef(result);
}

static PyObject *inbound_py(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *buf, *peer;
    Py_ssize_t n;
    Routes *r;
    long tun_mtu;
    int check_source;
    if (!PyArg_ParseTuple(args, "OnOO!lp:inbound", &buf, &n, &peer, &RoutesType, &r, &tun_mtu, &check_source))
        return NULL;
    Hop hop;
    if (parse_hop(peer, &hop) < 0)
        return NULL;
    Py_buffer view;
    if (writable_buffer(buf, &view, n) < 0)
        return NULL;
    uint8_t *b = view.buf;
    int ok = decide_in(r, b, n, routes_find_peer(r, hop.ip, hop.port), tun_mtu, check_source);
    if (ok)
        ttl_decrement(b);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyObject *complete_checksum_py(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *buf;
    Py_ssize_t n;
    unsigned start, offset;
    if (!PyArg_ParseTuple(args, "OnII:complete_checksum", &buf, &n, &start, &offset))
        return NULL;
    Py_buffer view;
    if (writable_buffer(buf, &view, n) < 0)
        return NULL;
    int ok = start <= 0xFFFF && offset <= 0xFFFF && csum_fits(n, start, offset);
    if (ok)
        csum_complete(view.buf, n, start, offset);
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

/* ---------------------------------------------------------------------------------------------------
 * The pass: the reader callbacks
 */

enum {
    TUN_WAKEUPS, TUN_READS, TUN_PACKETS, TUN_BYTES, UDP_SENDS, SENT_PACKETS, SENT_BYTES,
    UDP_WAKEUPS, UDP_RECVS, UDP_PACKETS, UDP_BYTES, TUN_WRITES, DELIVERED_PACKETS, DELIVERED_BYTES,
    NCOUNTERS
};

static const char *counter_names[NCOUNTERS] = {
    "tun_wakeups", "tun_reads", "tun_packets", "tun_bytes", "udp_sends", "sent_packets", "sent_bytes",
    "udp_wakeups", "udp_recvs", "udp_packets", "udp_bytes", "tun_writes", "delivered_packets", "delivered_bytes",
};

typedef struct {
    PyObject_HEAD
    PyObject *engine_dict; /* the Engine's __dict__: tracer, parked_writes */
    PyObject *counters, *peer_rx, *table, *compile, *pace_dict;
    PyObject *tun_side, *udp_side; /* the mover's halves: where the rest of a wake-up goes */
    PyObject *python_tun, *python_udp; /* their Python callbacks: the whole wake-up, while tracing */
    Routes *routes;
    long long routes_version;
    Py_ssize_t counter_offset[NCOUNTERS], version_offset;
    long long delta[NCOUNTERS];
    Py_ssize_t rx_peer; /* the hop whose datagrams are counted in rx_count, not yet in peer_rx */
    long long rx_count;
    int tun_fd, udp_fd, vnet, control_room;
    long long quiet_ns, tun_woke, udp_woke;
    Py_buffer tun_hdr, tun_buf, udp_buf;
} Pass;

static PyObject *s_tracer, *s_parked_writes, *s_bulk_until, *s_budget, *s_tun_mtu, *s_check_source;
static PyObject *s_lone_packet, *s_lone_unsent, *s_lone_read_failed, *s_lone_more;
static PyObject *s_lone_datagram, *s_lone_unwritten, *s_lone_recv_failed;

/* The offset of slot ``name`` (an object slot of ``obj``'s class) */
static int slot_offset(PyObject *obj, const char *name, Py_ssize_t *out)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)Py_TYPE(obj), name);
    if (descr == NULL)
        return -1;
    int ok = PyObject_TypeCheck(descr, &PyMemberDescr_Type)
             && ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
    if (ok)
        *out = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    if (!ok)
        PyErr_Format(PyExc_TypeError, "%s.%s must be a __slots__ attribute", Py_TYPE(obj)->tp_name, name);
    return ok ? 0 : -1;
}

static long long slot_int(PyObject *obj, Py_ssize_t offset, int *error)
{
    PyObject *value = *(PyObject **)((char *)obj + offset);
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a slot the C pass reads is not set");
        *error = 1;
        return 0;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        *error = 1;
    return v;
}

/* Add what this pass counted to the Python counters (and peer_rx); -1 with an exception set */
static int flush(Pass *p)
{
    for (int i = 0; i < NCOUNTERS; i++) {
        if (p->delta[i] == 0)
            continue;
        int error = 0;
        PyObject **slot = (PyObject **)((char *)p->counters + p->counter_offset[i]);
        long long v = slot_int(p->counters, p->counter_offset[i], &error);
        if (error)
            return -1;
        PyObject *sum = PyLong_FromLongLong(v + p->delta[i]);
        if (sum == NULL)
            return -1;
        Py_SETREF(*slot, sum);
        p->delta[i] = 0;
    }
    if (p->rx_count) {
        PyObject *peer = p->routes->hops[p->rx_peer].tuple;
        PyObject *old = PyDict_GetItemWithError(p->peer_rx, peer);
        long long v = 0;
        if (old != NULL) {
            v = PyLong_AsLongLong(old);
            if (v == -1 && PyErr_Occurred())
                return -1;
        } else if (PyErr_Occurred()) {
            return -1;
        }
        PyObject *sum = PyLong_FromLongLong(v + p->rx_count);
        if (sum == NULL)
            return -1;
        int status = PyDict_SetItem(p->peer_rx, peer, sum);
        Py_DECREF(sum);
        if (status < 0)
            return -1;
        p->rx_count = 0;
    }
    return 0;
}

/* One more datagram accepted from hop ``peer``: peer_rx gets one update per run of one peer's datagrams */
static int count_rx(Pass *p, Py_ssize_t peer)
{
    if (p->rx_count && p->rx_peer != peer && flush(p) < 0)
        return -1;
    p->rx_peer = peer;
    p->rx_count++;
    return 0;
}

/* The routes for this wake-up: compiled again if the RouteTable changed since. 0, or -1 with an exception */
static int current_routes(Pass *p)
{
    int error = 0;
    long long version = slot_int(p->table, p->version_offset, &error);
    if (error)
        return -1;
    if (p->routes != NULL && version == p->routes_version)
        return 0;
    if (p->rx_count && flush(p) < 0) /* its hop index belongs to the old table */
        return -1;
    PyObject *fresh = PyObject_CallOneArg(p->compile, p->table);
    if (fresh == NULL)
        return -1;
    if (!PyObject_TypeCheck(fresh, &RoutesType)) {
        Py_DECREF(fresh);
        PyErr_SetString(PyExc_TypeError, "compile() must return a udpflannel._lone.Routes");
        return -1;
    }
    Py_XSETREF(p->routes, (Routes *)fresh);
    p->routes_version = version;
    return 0;
}

/* An int attribute of the engine, read at each wake-up (the engine's settings may change) */
static long engine_long(Pass *p, PyObject *name)
{
    PyObject *value = PyDict_GetItemWithError(p->engine_dict, name);
    if (value == NULL) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_AttributeError, "the engine has no %U", name);
        return -1;
    }
    return PyLong_AsLong(value);
}

/* Whether the packet trace is on (then the Python callbacks take the whole wake-up); -1 on error */
static int tracing(Pass *p)
{
    PyObject *tracer = PyDict_GetItemWithError(p->engine_dict, s_tracer);
    if (tracer == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return tracer != Py_None;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic_ns's clock */
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* pace.Pace.woke: is the fd quiet (nothing for quiet_ns, and no batch moving)? -1 with an exception if
 * the pace's bulk_until is not an int */
static int quiet(Pass *p, long long *woke)
{
    long long now = now_ns(), last = *woke, bulk_until = 0;
    *woke = now;
    PyObject *until = PyDict_GetItemWithError(p->pace_dict, s_bulk_until);
    if (until != NULL)
        bulk_until = PyLong_AsLongLong(until);
    if (PyErr_Occurred())
        return -1;
    return now - last > p->quiet_ns && now > bulk_until;
}

/* Hand the rest of the wake-up to ``side.name(*args)``, counters flushed first; steals ``args`` */
static PyObject *hand_over(Pass *p, PyObject *side, PyObject *name, PyObject *args)
{
    if (args == NULL)
        return NULL;
    if (flush(p) < 0) {
        Py_DECREF(args);
        return NULL;
    }
    PyObject *method = PyObject_GetAttr(side, name);
    PyObject *result = method ? PyObject_Call(method, args, NULL) : NULL;
    Py_XDECREF(method);
    Py_DECREF(args);
    return result;
}

static PyObject *finish(Pass *p)
{
    if (flush(p) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* TUN -> UDP. Per-packet: drain up to the budget, but with a pace stop after the first packet on a quiet
 * fd. Fast path: the wake-up's first read, then the batch mover reads on unless the fd was quiet
 * (udpflannel/pace.py). */
static PyObject *pass_tun(Pass *p, PyObject *unused)
{
    (void)unused;
    int traced = tracing(p);
    if (traced)
        return traced < 0 ? NULL : PyObject_CallNoArgs(p->python_tun);
    if (current_routes(p) < 0)
        return NULL;
    uint8_t *hdr = p->tun_hdr.buf, *b = p->tun_buf.buf;
    Py_ssize_t room = p->vnet ? (p->tun_buf.len < MAX_IP_PACKET ? p->tun_buf.len : MAX_IP_PACKET) : p->tun_buf.len;
    long more = engine_long(p, s_budget);
    int read_on = 0;
    if (more == -1 && PyErr_Occurred())
        return NULL;
    p->delta[TUN_WAKEUPS]++;
    if (p->pace_dict != NULL && (read_on = quiet(p, &p->tun_woke)) >= 0)
        read_on = !read_on;
    if (PyErr_Occurred())
        return NULL;
    while (more-- > 0) {
        p->delta[TUN_READS]++;
        struct iovec iov[2] = {{hdr, VNET_HDR_LEN}, {b, (size_t)room}};
        ssize_t got = p->vnet ? readv(p->tun_fd, iov, 2) : read(p->tun_fd, b, (size_t)room);
        long after = p->vnet ? read_on : more;
        if (got < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return finish(p);
            if (errno == EINTR && !p->vnet)
                continue;
            return hand_over(p, p->tun_side, s_lone_read_failed, Py_BuildValue("(il)", errno, after));
        }
        Py_ssize_t n = got - (p->vnet ? VNET_HDR_LEN : 0);
        unsigned flags = p->vnet ? hdr[0] : 0, start = 0, offset = 0;
        Py_ssize_t hop = -1;
        if (n >= 0 && !(p->vnet && hdr[1] != 0)) { /* a super-packet (gso_type) goes to the batch mover */
            hop = decide_out(p->routes, b, n);
            if (flags & VNET_NEEDS_CSUM) {
                start = host16(hdr + 6);
                offset = host16(hdr + 8);
                if (!csum_fits(n, start, offset))
                    hop = -1;
            }
        }
        if (hop < 0)
            return hand_over(p, p->tun_side, s_lone_packet, Py_BuildValue("(nl)", n, after));
        if (flags & VNET_NEEDS_CSUM)
            csum_complete(b, n, start, offset);
        ttl_decrement(b);
        p->delta[TUN_PACKETS]++;
        p->delta[TUN_BYTES] += n;
        p->delta[UDP_SENDS]++;
        const Hop *to = &p->routes->hops[hop];
        if (sendto(p->udp_fd, b, (size_t)n, 0, (const struct sockaddr *)&to->addr, sizeof to->addr) < 0)
            return hand_over(p, p->tun_side, s_lone_unsent, Py_BuildValue("(nOil)", n, to->tuple, errno, after));
        p->delta[SENT_PACKETS]++;
        p->delta[SENT_BYTES] += n;
        if (p->vnet)
            return read_on ? hand_over(p, p->tun_side, s_lone_more, PyTuple_New(0)) : finish(p);
        if (p->pace_dict != NULL && !read_on)
            return finish(p); /* a quiet fd: back to sleep without the trailing read (pace.py) */
        read_on = 1;
    }
    return finish(p);
}

/* recvmsg's control data as socket.recvmsg returns it: [(level, type, data), ...] */
static PyObject *ancillary(struct msghdr *msg)
{
    PyObject *list = PyList_New(0);
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); list != NULL && c != NULL; c = CMSG_NXTHDR(msg, c)) {
        const uint8_t *data = CMSG_DATA(c);
        Py_ssize_t size = (Py_ssize_t)c->cmsg_len - (Py_ssize_t)(data - (const uint8_t *)c);
        PyObject *item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type, data, size > 0 ? size : 0);
        if (item == NULL || PyList_Append(list, item) < 0)
            Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

/* A datagram's sender as recvfrom names it: the hop's own tuple if it is one */
static PyObject *sender(Pass *p, const struct sockaddr_in *from, Py_ssize_t hop)
{
    if (hop >= 0)
        return Py_NewRef(p->routes->hops[hop].tuple);
    char text[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &from->sin_addr, text, sizeof text);
    return Py_BuildValue("(si)", text, ntohs(from->sin_port));
}

/* UDP -> TUN, the same way round */
static PyObject *pass_udp(Pass *p, PyObject *unused)
{
    (void)unused;
    int traced = tracing(p);
    if (traced)
        return traced < 0 ? NULL : PyObject_CallNoArgs(p->python_udp);
    if (current_routes(p) < 0)
        return NULL;
    uint8_t *b = p->udp_buf.buf;
    static const uint8_t plain[VNET_HDR_LEN]; /* vnet.PLAIN: nothing to do, checksums complete */
    long more = engine_long(p, s_budget), tun_mtu = engine_long(p, s_tun_mtu);
    int check_source = (int)engine_long(p, s_check_source), read_on = 0;
    if (PyErr_Occurred())
        return NULL;
    p->delta[UDP_WAKEUPS]++;
    if (p->pace_dict != NULL && (read_on = quiet(p, &p->udp_woke)) >= 0)
        read_on = !read_on;
    if (PyErr_Occurred())
        return NULL;
    while (more-- > 0) {
        p->delta[UDP_RECVS]++;
        struct sockaddr_in from;
        uint8_t control[CONTROL_ROOM];
        struct iovec iov = {b, (size_t)p->udp_buf.len};
        struct msghdr msg = {.msg_name = &from, .msg_namelen = sizeof from, .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = p->vnet ? control : NULL, .msg_controllen = p->vnet ? p->control_room : 0};
        ssize_t n = recvmsg(p->udp_fd, &msg, 0);
        long after = p->vnet ? read_on : more;
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return finish(p);
            if (errno == EINTR && !p->vnet)
                continue;
            return hand_over(p, p->udp_side, s_lone_recv_failed, Py_BuildValue("(il)", errno, after));
        }
        Py_ssize_t hop = -1;
        if (msg.msg_namelen == sizeof from && from.sin_family == AF_INET)
            hop = routes_find_peer(p->routes, ntohl(from.sin_addr.s_addr), ntohs(from.sin_port));
        int busy = 0;
        if (p->vnet) {
            PyObject *parked = PyDict_GetItemWithError(p->engine_dict, s_parked_writes);
            busy = msg.msg_controllen > 0 || msg.msg_flags != 0 || (parked != NULL && PyObject_IsTrue(parked) != 0);
        }
        if (busy || !decide_in(p->routes, b, n, hop, tun_mtu, check_source)) {
            PyObject *who = sender(p, &from, hop);
            PyObject *control_data = who && p->vnet ? ancillary(&msg) : PyList_New(0);
            PyObject *args = who && control_data ? Py_BuildValue("(nOOil)", (Py_ssize_t)n, who, control_data,
                                                                 msg.msg_flags, after) : NULL;
            Py_XDECREF(who);
            Py_XDECREF(control_data);
            return hand_over(p, p->udp_side, s_lone_datagram, args);
        }
        ttl_decrement(b);
        p->delta[UDP_PACKETS]++;
        p->delta[UDP_BYTES] += n;
        if (count_rx(p, hop) < 0)
            return NULL;
        p->delta[TUN_WRITES]++;
        struct iovec out[2] = {{(void *)plain, VNET_HDR_LEN}, {b, (size_t)n}};
        ssize_t wrote = p->vnet ? writev(p->tun_fd, out, 2) : write(p->tun_fd, b, (size_t)n);
        if (wrote < 0)
            return hand_over(p, p->udp_side, s_lone_unwritten, Py_BuildValue("(nil)", (Py_ssize_t)n, errno, after));
        p->delta[DELIVERED_PACKETS]++;
        p->delta[DELIVERED_BYTES] += n;
        if (p->vnet)
            return read_on ? hand_over(p, p->udp_side, s_lone_more, PyTuple_New(0)) : finish(p);
        if (p->pace_dict != NULL && !read_on)
            return finish(p); /* a quiet socket: back to sleep without the trailing receive (pace.py) */
        read_on = 1;
    }
    return finish(p);
}

static int pass_traverse(Pass *p, visitproc visit, void *arg)
{
    Py_VISIT(p->engine_dict);
    Py_VISIT(p->counters);
    Py_VISIT(p->peer_rx);
    Py_VISIT(p->table);
    Py_VISIT(p->compile);
    Py_VISIT(p->pace_dict);
    Py_VISIT(p->tun_side);
    Py_VISIT(p->udp_side);
    Py_VISIT(p->python_tun);
    Py_VISIT(p->python_udp);
    Py_VISIT(p->routes);
    return 0;
}

static int pass_clear(Pass *p)
{
    Py_CLEAR(p->engine_dict);
    Py_CLEAR(p->counters);
    Py_CLEAR(p->peer_rx);
    Py_CLEAR(p->table);
    Py_CLEAR(p->compile);
    Py_CLEAR(p->pace_dict);
    Py_CLEAR(p->tun_side);
    Py_CLEAR(p->udp_side);
    Py_CLEAR(p->python_tun);
    Py_CLEAR(p->python_udp);
    Py_CLEAR(p->routes);
    return 0;
}

static void pass_dealloc(Pass *p)
{
    PyObject_GC_UnTrack(p);
    pass_clear(p);
    if (p->tun_hdr.obj)
        PyBuffer_Release(&p->tun_hdr);
    if (p->tun_buf.obj)
        PyBuffer_Release(&p->tun_buf);
    if (p->udp_buf.obj)
        PyBuffer_Release(&p->udp_buf);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *pass_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"engine", "table", "compile", "tun_side", "udp_side", "python_tun", "python_udp",
                            "tun_buf", "udp_buf", "tun_hdr", "pace", "quiet_ns", "control_room", NULL};
    PyObject *engine, *table, *compile, *tun_side, *udp_side, *python_tun, *python_udp, *tun_buf, *udp_buf;
    PyObject *tun_hdr = Py_None, *pace = Py_None;
    long long quiet_ns = 0;
    int control_room = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOO|$OOLi:Pass", names, &engine, &table, &compile,
                                     &tun_side, &udp_side, &python_tun, &python_udp, &tun_buf, &udp_buf, &tun_hdr,
                                     &pace, &quiet_ns, &control_room))
        return NULL;
    if (tun_hdr != Py_None && pace == Py_None)
        return PyErr_Format(PyExc_ValueError, "the fast path's pass (tun_hdr) needs a pace");
    if (control_room < 0 || control_room > CONTROL_ROOM)
        return PyErr_Format(PyExc_ValueError, "control_room must be 0..%d", CONTROL_ROOM);
    Pass *p = (Pass *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->vnet = tun_hdr != Py_None;
    p->quiet_ns = quiet_ns;
    p->control_room = control_room;
    p->table = Py_NewRef(table);
    p->compile = Py_NewRef(compile);
    p->tun_side = Py_NewRef(tun_side);
    p->udp_side = Py_NewRef(udp_side);
    p->python_tun = Py_NewRef(python_tun);
    p->python_udp = Py_NewRef(python_udp);
    PyObject *fd = NULL, *udp = NULL;
    p->engine_dict = PyObject_GetAttrString(engine, "__dict__");
    p->counters = p->engine_dict ? PyObject_GetAttrString(engine, "counters") : NULL;
    p->peer_rx = p->counters ? PyObject_GetAttrString(engine, "peer_rx") : NULL;
    if (p->peer_rx == NULL)
        goto fail;
    if (!PyDict_Check(p->engine_dict) || !PyDict_Check(p->peer_rx)) {
        PyErr_SetString(PyExc_TypeError, "the engine's __dict__ and peer_rx must be dicts");
        goto fail;
    }
    for (int i = 0; i < NCOUNTERS; i++)
        if (slot_offset(p->counters, counter_names[i], &p->counter_offset[i]) < 0)
            goto fail;
    if (slot_offset(table, "version", &p->version_offset) < 0)
        goto fail;
    if (pace != Py_None) {
        p->pace_dict = PyObject_GetAttrString(pace, "__dict__");
        if (p->pace_dict == NULL || !PyDict_Check(p->pace_dict)) {
            PyErr_SetString(PyExc_TypeError, "pace must have a __dict__");
            goto fail;
        }
    }
    if (p->vnet) {
        if (PyObject_GetBuffer(tun_hdr, &p->tun_hdr, PyBUF_WRITABLE) < 0)
            goto fail;
        if (p->tun_hdr.len < VNET_HDR_LEN) {
            PyErr_SetString(PyExc_ValueError, "tun_hdr must hold a virtio_net_hdr");
            goto fail;
        }
    }
    if (PyObject_GetBuffer(tun_buf, &p->tun_buf, PyBUF_WRITABLE) < 0 || PyObject_GetBuffer(udp_buf, &p->udp_buf, PyBUF_WRITABLE) < 0)
        goto fail;
    if (p->tun_buf.len < MAX_IP_PACKET || p->udp_buf.len < MAX_IP_PACKET) {
        PyErr_SetString(PyExc_ValueError, "the buffers must hold any IPv4 packet");
        goto fail;
    }
    fd = PyObject_GetAttrString(engine, "tun_fd");
    udp = fd ? PyObject_GetAttrString(engine, "udp") : NULL;
    if (udp != NULL)
        Py_SETREF(udp, PyObject_CallMethod(udp, "fileno", NULL));
    if (udp == NULL)
        goto fail;
    p->tun_fd = (int)PyLong_AsLong(fd);
    p->udp_fd = (int)PyLong_AsLong(udp);
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(fd);
    Py_DECREF(udp);
    return (PyObject *)p;
fail:
    Py_XDECREF(fd);
    Py_XDECREF(udp);
    Py_DECREF(p);
    return NULL;
}

static PyMethodDef pass_methods[] = {
    {"tun_readable", (PyCFunction)pass_tun, METH_NOARGS, "The TUN's reader callback."},
    {"udp_readable", (PyCFunction)pass_udp, METH_NOARGS, "The UDP socket's reader callback."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PassType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "udpflannel._lone.Pass",
    .tp_basicsize = sizeof(Pass),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The reader callbacks of one engine, in C (see udpflannel/lone.py).",
    .tp_new = pass_new,
    .tp_dealloc = (destructor)pass_dealloc,
    .tp_traverse = (traverseproc)pass_traverse,
    .tp_clear = (inquiry)pass_clear,
    .tp_methods = pass_methods,
};

static PyMethodDef methods[] = {
    {"outbound", outbound_py, METH_VARARGS,
     "outbound(buf, n, routes) -> the next hop, the TTL decremented, if forward.outbound would forward; else None"},
    {"inbound", inbound_py, METH_VARARGS,
     "inbound(buf, n, peer, routes, tun_mtu, check_source) -> True, the TTL decremented, if forward.inbound would forward"},
    {"complete_checksum", complete_checksum_py, METH_VARARGS,
     "complete_checksum(buf, n, csum_start, csum_offset) -> bool, as tun.vnet.complete_checksum"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "udpflannel._lone",
    .m_doc = "A lone packet's pass in C: the reader callbacks and the decisions they take (see udpflannel/lone.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__lone(void)
{
    struct { PyObject **s; const char *text; } strings[] = {
        {&s_tracer, "tracer"}, {&s_parked_writes, "parked_writes"}, {&s_bulk_until, "bulk_until"},
        {&s_budget, "budget"}, {&s_tun_mtu, "tun_mtu"}, {&s_check_source, "check_source"}, {&s_lone_packet, "lone_packet"}, {&s_lone_unsent, "lone_unsent"},
        {&s_lone_read_failed, "lone_read_failed"}, {&s_lone_more, "lone_more"}, {&s_lone_datagram, "lone_datagram"},
        {&s_lone_unwritten, "lone_unwritten"}, {&s_lone_recv_failed, "lone_recv_failed"},
    };
    for (size_t i = 0; i < sizeof strings / sizeof strings[0]; i++)
        if ((*strings[i].s = PyUnicode_InternFromString(strings[i].text)) == NULL)
            return NULL;
    if (PyType_Ready(&RoutesType) < 0 || PyType_Ready(&PassType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Routes", (PyObject *)&RoutesType) < 0
        || PyModule_AddObjectRef(m, "Pass", (PyObject *)&PassType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
