/* msb_proxy._relay: the loop of relay.Relay in C (optional; relay.py is the reference).
 *
 * One call serves the client's pipe and one guest process's stdout until anything needs the
 * event loop or asyncssh, exactly as Relay.run does in Python, but without a Python frame per
 * message: that is what a request/answer transfer (scp -r of small files) spends its time on.
 *
 * Nothing here owns protocol state. The caller passes the state in and takes it back from the
 * result: sequence numbers, windows, bytes sent since the last key exchange. The cipher is the
 * caller's own CTR context, called through its `update` method, so the key stream stays where
 * asyncssh's cipher expects it; the MAC is UMAC through nettle, called on the caller's keyed
 * context (umac.CachedKeyUMAC) through the function addresses ctypes resolved. Whatever this
 * does not handle it hands back untouched or, for the one packet it had to decrypt to see its
 * type, with its plaintext, and returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

typedef void (*nettle_fn)(void *ctx, size_t length, const uint8_t *data);

enum {
    LOOP = 0,         /* something else wants the loop: another descriptor, a timer, a hang-up */
    CLIENT_READ = 1,  /* reading the client's pipe met end of file or an error */
    GUEST_READ = 2,   /* reading the guest's stdout met end of file or an error */
    USUAL = 3,        /* data left for the usual path: no window, or a key exchange is due */
    HANDED = 4,       /* stopped to hand back a packet, bytes, or what a pipe did not take */
};

#define CHANNEL_DATA 94
#define WINDOW_ADJUST 93
#define DATA_HEADER 10      /* padding length, type, recipient, data length */
#define CLIENT_READ_SIZE (1 << 20)
#define GUEST_READ_SIZE (256 << 10)
#define RANDOM_POOL 4096

typedef struct {
    PyObject *update;     /* the CTR context's update method */
    void *mac;            /* the keyed UMAC context */
    nettle_fn set_nonce, mac_update, digest;
    size_t tag;           /* tag bytes */
    int64_t nonce;        /* the sequence number the context's nonce is at; -1: unknown */
    uint32_t seq;
} Direction;

typedef struct {
    Direction in, out;
    uint32_t blocksize_in, max_length, blocksize_out, enchdrlen;
    uint32_t local_id, peer_id;
    int take_data;        /* whether channel data may go to the guest (else it is handed back) */
    int64_t recv_window, init_window, send_window, packet_size;
    int64_t rekey_left;   /* bytes that may still be sent before a key exchange */
    double rekey_at;      /* monotonic time of a time-based key exchange; 0: none */
    double deadline;      /* monotonic time of the loop's next timer; 0: none */
    int epfd, client_in, client_out, guest_in, guest_out;
    /* what the caller takes back */
    int64_t sent;         /* bytes sealed, for the re-key count */
    long packets_in, reads;
    uint8_t pool[RANDOM_POOL];
    size_t pool_used;
} Relay;

typedef struct {
    uint8_t *data;
    size_t size, capacity;
} Buffer;

static int reserve(Buffer *buffer, size_t more)
{
    if (buffer->size + more <= buffer->capacity)
        return 0;
    size_t capacity = buffer->capacity ? buffer->capacity : 65536;
    while (capacity < buffer->size + more)
        capacity *= 2;
    uint8_t *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

static double monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

static void put32(uint8_t *at, uint32_t value)
{
    at[0] = (uint8_t)(value >> 24);
    at[1] = (uint8_t)(value >> 16);
    at[2] = (uint8_t)(value >> 8);
    at[3] = (uint8_t)value;
}

static uint32_t get32(const uint8_t *at)
{
    return ((uint32_t)at[0] << 24) | ((uint32_t)at[1] << 16) | ((uint32_t)at[2] << 8) | at[3];
}

/* The UMAC tag of `length` bytes at `data` for packet `seq`, into `tag`. */
static void mac_of(Direction *direction, const uint8_t *data, size_t length, uint8_t *tag)
{
    if (direction->nonce != (int64_t)direction->seq) {
        uint8_t nonce[8] = {0, 0, 0, 0};
        put32(nonce + 4, direction->seq);
        direction->set_nonce(direction->mac, 8, nonce);
    }
    direction->mac_update(direction->mac, length, data);
    direction->digest(direction->mac, direction->tag, tag);  /* moves the nonce on by one */
    direction->nonce = (int64_t)direction->seq + 1;
}

/* `length` bytes through the direction's cipher, into `into`; -1 with an exception set. */
static int cipher(Direction *direction, const uint8_t *data, size_t length, uint8_t *into)
{
    PyObject *input = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)length);
    if (input == NULL)
        return -1;
    PyObject *output = PyObject_CallOneArg(direction->update, input);
    Py_DECREF(input);
    if (output == NULL)
        return -1;
    if (!PyBytes_Check(output) || (size_t)PyBytes_GET_SIZE(output) != length) {
        Py_DECREF(output);
        PyErr_SetString(PyExc_RuntimeError, "the cipher returned an unexpected length");
        return -1;
    }
    memcpy(into, PyBytes_AS_STRING(output), length);
    Py_DECREF(output);
    return 0;
}

static int random_bytes(Relay *relay, uint8_t *into, size_t length)
{
    if (relay->pool_used + length > RANDOM_POOL) {
        size_t got = 0;
        while (got < RANDOM_POOL) {
            ssize_t n = getrandom(relay->pool + got, RANDOM_POOL - got, 0);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            got += (size_t)n;
        }
        relay->pool_used = 0;
    }
    memcpy(into, relay->pool + relay->pool_used, length);
    relay->pool_used += length;
    return 0;
}

/* Append one sealed packet (payload: `head`, then `data`) to `out`; 1 when a key exchange is
 * due first (nothing appended), -1 on error. */
static int seal(Relay *relay, Buffer *out, const uint8_t *head, size_t head_size,
                const uint8_t *data, size_t data_size)
{
    if (relay->sent >= relay->rekey_left || (relay->rekey_at > 0 && monotonic() >= relay->rekey_at))
        return 1;
    size_t payload = head_size + data_size;
    size_t padding = (relay->blocksize_out - (relay->enchdrlen + payload) % relay->blocksize_out)
                     % relay->blocksize_out;
    if (padding < 4)
        padding += relay->blocksize_out;
    size_t plain_size = 1 + payload + padding;
    if (reserve(out, 4 + plain_size + relay->out.tag) < 0)
        return -1;
    uint8_t *packet = out->data + out->size;
    uint8_t *plain = packet + 4;
    put32(packet, (uint32_t)plain_size);
    plain[0] = (uint8_t)padding;
    memcpy(plain + 1, head, head_size);
    if (data_size)
        memcpy(plain + 1 + head_size, data, data_size);
    if (random_bytes(relay, plain + 1 + payload, padding) < 0)
        return -1;
    if (cipher(&relay->out, plain, plain_size, plain) < 0)
        return -1;
    mac_of(&relay->out, packet, 4 + plain_size, packet + 4 + plain_size);
    relay->out.seq += 1;
    relay->sent += (int64_t)plain_size;
    out->size += 4 + plain_size + relay->out.tag;
    return 0;
}

/* Write `buffer` to `fd` as far as it goes without blocking; what is left stays in it. */
static int flush(int fd, Buffer *buffer)
{
    size_t done = 0;
    while (done < buffer->size) {
        ssize_t n = write(fd, buffer->data + done, buffer->size - done);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            break;  /* the transport's own write meets the error and reports it */
        }
        done += (size_t)n;
    }
    memmove(buffer->data, buffer->data + done, buffer->size - done);
    buffer->size -= done;
    return buffer->size == 0;
}

typedef struct {
    Buffer held;       /* client bytes not yet taken: the start of a packet */
    Buffer to_guest;   /* channel data for the guest's stdin not yet written */
    Buffer to_client;  /* sealed packets not yet written */
    Buffer from_guest; /* guest output not yet sent (window or re-key) */
    PyObject *packet, *plain;  /* a packet decrypted that asyncssh must have */
} Pending;

/* Take the complete packets of `pending->held`. 0: go on; 1: stop (something for asyncssh);
 * -1: error. */
static int take_packets(Relay *relay, Pending *pending)
{
    Buffer *held = &pending->held;
    size_t pos = 0;
    int result = 0;
    while (held->size - pos >= 4) {
        const uint8_t *start = held->data + pos;
        uint32_t length = get32(start);
        if (length < relay->blocksize_in || length > relay->max_length
                || length % relay->blocksize_in != 0) {
            result = 1;  /* asyncssh says what is wrong with it */
            break;
        }
        size_t end = 4 + (size_t)length + relay->in.tag;
        if (held->size - pos < end)
            break;
        uint8_t tag[16], differ = 0;
        mac_of(&relay->in, start, 4 + length, tag);
        for (size_t i = 0; i < relay->in.tag; i++)
            differ |= tag[i] ^ start[4 + length + i];
        if (differ) {
            relay->in.nonce = -1;
            result = 1;  /* asyncssh checks it again and ends the connection */
            break;
        }
        PyObject *plain_object = PyBytes_FromStringAndSize(NULL, length);
        if (plain_object == NULL)
            return -1;
        uint8_t *plain = (uint8_t *)PyBytes_AS_STRING(plain_object);
        if (cipher(&relay->in, start + 4, length, plain) < 0) {
            Py_DECREF(plain_object);
            return -1;
        }
        uint32_t padding = plain[0];
        int64_t data_end = (int64_t)length - padding;
        int64_t size = data_end - DATA_HEADER;
        if (plain[1] == CHANNEL_DATA && padding >= 4 && size > 0
                && get32(plain + 6) == (uint32_t)size && get32(plain + 2) == relay->local_id
                && size <= relay->recv_window && relay->take_data) {
            if (reserve(&pending->to_guest, (size_t)size) < 0) {
                Py_DECREF(plain_object);
                return -1;
            }
            memcpy(pending->to_guest.data + pending->to_guest.size, plain + DATA_HEADER,
                   (size_t)size);
            pending->to_guest.size += (size_t)size;
            Py_DECREF(plain_object);
            relay->recv_window -= size;
            relay->in.seq += 1;
            relay->packets_in += 1;
            pos += end;
            continue;
        }
        /* Anything else, MSG_IGNORE included, goes to asyncssh as the Python loop sends it. */
        pending->packet = PyBytes_FromStringAndSize((const char *)start, (Py_ssize_t)end);
        pending->plain = plain_object;
        if (pending->packet == NULL)
            return -1;
        pos += end;
        result = 1;
        break;
    }
    memmove(held->data, held->data + pos, held->size - pos);
    held->size -= pos;
    return result;
}

/* The window adjust asyncssh would send once half the window is used; none while the data
 * is not taken here (the channel paused, its stdin full: asyncssh sends it on delivery). */
static int adjust_window(Relay *relay, Pending *pending)
{
    if (!relay->take_data || (double)relay->recv_window >= (double)relay->init_window / 2)
        return 0;
    uint8_t head[9];
    head[0] = WINDOW_ADJUST;
    put32(head + 1, relay->peer_id);
    put32(head + 5, (uint32_t)(relay->init_window - relay->recv_window));
    int sealed = seal(relay, &pending->to_client, head, sizeof head, NULL, 0);
    if (sealed == 0)
        relay->recv_window = relay->init_window;
    return sealed;
}

/* Send what fits of `pending->from_guest` as channel data. 0: all sent; 1: not all (window,
 * re-key); -1: error. */
static int send_output(Relay *relay, Pending *pending)
{
    Buffer *data = &pending->from_guest;
    size_t pos = 0;
    int result = 0;
    while (pos < data->size) {
        int64_t size = (int64_t)(data->size - pos);
        if (size > relay->packet_size)
            size = relay->packet_size;
        if (size > relay->send_window)
            size = relay->send_window;
        if (size <= 0) {
            result = 1;
            break;
        }
        uint8_t head[9];
        head[0] = CHANNEL_DATA;
        put32(head + 1, relay->peer_id);
        put32(head + 5, (uint32_t)size);
        int sealed = seal(relay, &pending->to_client, head, sizeof head, data->data + pos,
                          (size_t)size);
        if (sealed != 0) {
            result = sealed;
            break;
        }
        relay->send_window -= size;
        pos += (size_t)size;
    }
    memmove(data->data, data->data + pos, data->size - pos);
    data->size -= pos;
    return result;
}

/* Read what `fd` has into `buffer`: 1 read, 0 nothing yet, -1 end of file or an error. */
static int read_into(int fd, Buffer *buffer, size_t size)
{
    if (reserve(buffer, size) < 0)
        return -2;
    for (;;) {
        ssize_t n = read(fd, buffer->data + buffer->size, size);
        if (n > 0) {
            buffer->size += (size_t)n;
            return 1;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return 0;
        return -1;
    }
}

/* After client bytes arrived: take their packets, write what they carry. Returns -1, HANDED
 * when something is left for asyncssh or a write did not finish, USUAL, or 1 to go on. */
static int after_client(Relay *relay, Pending *pending)
{
    int taken = take_packets(relay, pending);
    if (taken < 0)
        return -1;
    int adjusted = adjust_window(relay, pending);
    if (adjusted < 0)
        return -1;
    if (pending->to_guest.size && !flush(relay->guest_in, &pending->to_guest))
        return HANDED;
    if (pending->to_client.size && !flush(relay->client_out, &pending->to_client))
        return HANDED;
    if (adjusted)
        return USUAL;
    return taken ? HANDED : 1;
}

static int serve(Relay *relay, Pending *pending)
{
    struct epoll_event events[2];
    if (pending->held.size) {
        int went = after_client(relay, pending);
        if (went != 1)
            return went;
    }
    for (;;) {
        int timeout = -1;
        if (relay->deadline > 0) {
            double left = relay->deadline - monotonic();
            if (left <= 0)
                return LOOP;
            timeout = left < 86400 ? (int)(left * 1000) + 1 : 86400 * 1000;
        }
        int n;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(relay->epfd, events, 2, timeout);
        Py_END_ALLOW_THREADS
        if (n < 0 && errno == EINTR)
            return LOOP;  /* a signal: asyncio's wakeup descriptor has it */
        if (n != 1 || events[0].events != EPOLLIN)
            return LOOP;
        int fd = events[0].data.fd;
        if (fd == relay->client_in) {
            int got = read_into(fd, &pending->held, CLIENT_READ_SIZE);
            if (got == -2)
                return -1;
            if (got < 0)
                return CLIENT_READ;
            if (got == 0)
                continue;
            relay->reads += 1;
            int went = after_client(relay, pending);
            if (went != 1)
                return went;
        } else if (fd == relay->guest_out) {
            int got = read_into(fd, &pending->from_guest, GUEST_READ_SIZE);
            if (got == -2)
                return -1;
            if (got < 0)
                return GUEST_READ;
            if (got == 0)
                continue;
            relay->reads += 1;
            int sent = send_output(relay, pending);
            if (sent < 0)
                return -1;
            if (pending->to_client.size && !flush(relay->client_out, &pending->to_client))
                return HANDED;
            if (sent)
                return USUAL;
        } else {
            return LOOP;
        }
    }
}

static int direction_from(PyObject *tuple, Direction *direction)
{
    /* (update, mac context, set_nonce, update, digest, tag bytes, nonce, seq) */
    unsigned long long context, set_nonce, mac_update, digest;
    long long nonce;
    unsigned long seq;
    Py_ssize_t tag;
    if (!PyArg_ParseTuple(tuple, "OKKKKnLk", &direction->update, &context, &set_nonce,
                          &mac_update, &digest, &tag, &nonce, &seq))
        return -1;
    if (tag != 8 && tag != 16) {
        PyErr_SetString(PyExc_ValueError, "tag size");
        return -1;
    }
    direction->mac = (void *)(uintptr_t)context;
    direction->set_nonce = (nettle_fn)(uintptr_t)set_nonce;
    direction->mac_update = (nettle_fn)(uintptr_t)mac_update;
    direction->digest = (nettle_fn)(uintptr_t)digest;
    direction->tag = (size_t)tag;
    direction->nonce = nonce;
    direction->seq = (uint32_t)seq;
    return 0;
}

static PyObject *bytes_of(Buffer *buffer)
{
    if (buffer->size == 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)buffer->data, (Py_ssize_t)buffer->size);
}

PyDoc_STRVAR(run_doc,
"run(fds, inbound, outbound, limits) -> (reason, state, to_client, to_guest, packet, plain,\n"
"                                         client_rest, guest_rest)\n\n"
"Serve the client's pipe and the guest's stdout until anything else needs the loop.\n"
"See msb_proxy/relay.py for the arguments and what the caller does with the result.");

static PyObject *run(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *inbound, *outbound;
    const char *held;
    Py_ssize_t held_size;
    Relay *relay = PyMem_Calloc(1, sizeof(Relay));
    if (relay == NULL)
        return PyErr_NoMemory();
    relay->pool_used = RANDOM_POOL;
    if (!PyArg_ParseTuple(args, "(iiiii)O!O!(IIIIIIpLLLLLdd)y#", &relay->epfd, &relay->client_in,
                          &relay->client_out, &relay->guest_in, &relay->guest_out,
                          &PyTuple_Type, &inbound, &PyTuple_Type, &outbound,
                          &relay->blocksize_in, &relay->max_length, &relay->blocksize_out,
                          &relay->enchdrlen, &relay->local_id, &relay->peer_id,
                          &relay->take_data, &relay->recv_window, &relay->init_window, &relay->send_window,
                          &relay->packet_size, &relay->rekey_left, &relay->rekey_at,
                          &relay->deadline, &held, &held_size)
            || direction_from(inbound, &relay->in) < 0
            || direction_from(outbound, &relay->out) < 0) {
        PyMem_Free(relay);
        return NULL;
    }
    if (relay->blocksize_in == 0 || relay->blocksize_out == 0) {
        PyMem_Free(relay);
        PyErr_SetString(PyExc_ValueError, "block size");
        return NULL;
    }
    Pending pending;
    memset(&pending, 0, sizeof pending);
    int reason;
    if (reserve(&pending.held, (size_t)held_size) < 0) {
        reason = -1;
    } else {
        if (held_size)
            memcpy(pending.held.data, held, (size_t)held_size);
        pending.held.size = (size_t)held_size;
        reason = serve(relay, &pending);
    }
    PyObject *result = NULL;
    if (reason >= 0) {
        result = Py_BuildValue(
            "i(kLkLLLLll)NNNNNN", reason,
            (unsigned long)relay->in.seq, (long long)relay->in.nonce,
            (unsigned long)relay->out.seq, (long long)relay->out.nonce,
            (long long)relay->recv_window, (long long)relay->send_window,
            (long long)relay->sent, relay->packets_in, relay->reads,
            bytes_of(&pending.to_client), bytes_of(&pending.to_guest),
            pending.packet ? pending.packet : Py_NewRef(Py_None),
            pending.plain ? pending.plain : Py_NewRef(Py_None),
            bytes_of(&pending.held), bytes_of(&pending.from_guest));
        pending.packet = pending.plain = NULL;  /* the result has them */
    }
    Py_XDECREF(pending.packet);
    Py_XDECREF(pending.plain);
    PyMem_Free(pending.held.data);
    PyMem_Free(pending.to_guest.data);
    PyMem_Free(pending.to_client.data);
    PyMem_Free(pending.from_guest.data);
    PyMem_Free(relay);
    return result;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_relay", "The relay loop in C (see relay.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__relay(void)
{
    return PyModule_Create(&module);
}
