/*
 * bench_load: the load generator of scripts/bench.
 *
 * One thread, one epoll set, non-blocking sockets. Per request it makes the same
 * system calls as the fastest server under test (one send, one recv), so a server
 * slower than the C epoll server is the bottleneck, not this program. Every reply is
 * checked byte for byte against the reply the protocol requires.
 *
 * Modes:
 *   rr       request-reply on --conns connections, one request in flight on each,
 *            after opening --idle more connections that only stay open; --warmup
 *            seconds unmeasured, then --duration seconds measured
 *   connect  a new connection per request (connect, send, read reply, close),
 *            --conns connections in flight at once
 *   hold     open --conns connections, print a ready line, keep them open until
 *            stdin closes or --duration passes
 *
 * Every connection is opened with one "ping\n" exchange first, so when the ready
 * point is reached the server has accepted and served every connection.
 * Output: one JSON object per line on stdout. Exit 0 on success, 1 on any error
 * (the JSON then has an "error" member).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define THANKS_PREFIX "Thank you for your message "
#define PING "ping\n"
#define RECV_BUF (256 * 1024)
#define MAX_EVENTS 1024
#define STDIN_TAG UINT32_MAX

/* Log-linear latency histogram in nanoseconds: 32 sub-buckets per power of two, so
   a reported percentile is within about 3% of the true value. */
#define SUB_BITS 5
#define SUB_COUNT (1 << SUB_BITS)
#define BUCKETS (64 * SUB_COUNT)

enum state { ST_FREE, ST_CONNECTING, ST_PING, ST_IDLE, ST_ACTIVE };
enum mode { MODE_RR, MODE_CONNECT, MODE_HOLD };

typedef struct {
    int fd;
    int state;
    uint32_t interest;
    const char *out;
    size_t out_len, sent;
    const char *exp;
    size_t exp_len, got;
    uint64_t t0;
} conn_t;

static struct {
    enum mode mode;
    const char *host;
    int port;
    int thanks;
    size_t size;
    int conns, idle, max_pending;
    double duration, warmup, timeout;
    int server_pid;
} opt = {MODE_RR, "127.0.0.1", 0, 0, 1024, 50, 0, 64, 5.0, 0.5, 0, 0};

static int epfd;
static struct sockaddr_in addr;
static conn_t *conns;
static int nconns;
static char *req, *rep, *ping_rep;
static size_t req_len, rep_len, ping_rep_len;
static char *rbuf;
static uint64_t hist[BUCKETS];
static uint64_t requests, reply_bytes, max_ns;
static int measuring;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    /* The message never holds a quote or backslash: it is made from fixed text,
       numbers and strerror(). */
    printf("{\"error\": \"%s\"}\n", msg);
    fflush(stdout);
    exit(1);
}

static int bucket_of(uint64_t v) {
    if (v < SUB_COUNT) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    return ((shift + 1) << SUB_BITS) + (int)((v >> shift) & (SUB_COUNT - 1));
}

static double bucket_mid(int b) {
    if (b < SUB_COUNT) return b;
    int shift = (b >> SUB_BITS) - 1;
    uint64_t low = (uint64_t)(SUB_COUNT + (b & (SUB_COUNT - 1))) << shift;
    return (double)low + (double)((uint64_t)1 << shift) / 2.0;
}

static double percentile_us(double p) {
    uint64_t total = 0, seen = 0;
    for (int b = 0; b < BUCKETS; b++) total += hist[b];
    if (total == 0) return 0;
    uint64_t rank = (uint64_t)(p * (double)total);
    if (rank < 1) rank = 1;
    for (int b = 0; b < BUCKETS; b++) {
        seen += hist[b];
        if (seen >= rank) return bucket_mid(b) / 1000.0;
    }
    return (double)max_ns / 1000.0;
}

/* utime and stime of a process in seconds (into *user and *sys); -1 when they
   cannot be read. */
static double proc_times_s(int pid, double *user, double *sys) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (!p) return -1;
    unsigned long utime = 0, stime = 0;
    /* after ")": state(3) ... utime is field 14, stime field 15 */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    double tick = (double)sysconf(_SC_CLK_TCK);
    *user = (double)utime / tick;
    *sys = (double)stime / tick;
    return *user + *sys;
}

/* Seconds this process was runnable but waiting for its CPU (schedstat run_delay):
   another program on the load generator's CPU shows here, and makes a run suspect. */
static double self_wait_s(void) {
    FILE *f = fopen("/proc/self/schedstat", "r");
    if (!f) return -1;
    unsigned long long run = 0, wait = 0;
    int n = fscanf(f, "%llu %llu", &run, &wait);
    fclose(f);
    return n == 2 ? (double)wait / 1e9 : -1;
}

/* Busy time (all but idle and iowait, steal included) of each CPU, from /proc/stat:
   with our own CPU time, it tells how much of our CPUs another program took. */
#define MAX_CPUS 256
typedef struct {
    unsigned long long busy[MAX_CPUS], total[MAX_CPUS];
    int n;
} cpustat_t;

static void read_cpustat(cpustat_t *st) {
    st->n = 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "cpu", 3) || line[3] < '0' || line[3] > '9') continue;
        int cpu;
        unsigned long long v[8] = {0};
        if (sscanf(line + 3, "%d %llu %llu %llu %llu %llu %llu %llu %llu", &cpu, &v[0], &v[1],
                   &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]) < 6 ||
            cpu < 0 || cpu >= MAX_CPUS)
            continue;
        unsigned long long total = 0;
        for (int i = 0; i < 8; i++) total += v[i];
        st->total[cpu] = total;
        st->busy[cpu] = total - v[3] - v[4];
        if (cpu + 1 > st->n) st->n = cpu + 1;
    }
    fclose(f);
}

static double self_cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static void set_interest(conn_t *c, uint32_t events) {
    if (c->interest == events) return;
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) fail("epoll_ctl: %s", strerror(errno));
    c->interest = events;
}

/* In connect mode every connection leaves a TIME_WAIT entry on this side, and with
   a single client address the kernel's search for a free ephemeral port among tens of
   thousands of them costs more than the whole exchange. So connect mode binds source
   ports itself, round robin over a range below the kernel's ephemeral range (which it
   thus leaves untouched for the other modes); a port is reused after its TIME_WAIT
   entry is more than a second old, which tcp_tw_reuse allows on loopback. */
static int port_lo, port_hi, port_next;

static void bind_source_port(int fd) {
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr = addr.sin_addr};
    for (int tries = 0; tries < port_hi - port_lo; tries++) {
        int port = port_next++;
        if (port_next >= port_hi) port_next = port_lo;
        src.sin_port = htons((uint16_t)port);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) == 0) return;
        if (errno != EADDRINUSE) fail("bind: %s", strerror(errno));
    }
    fail("no free source port in %d..%d", port_lo, port_hi - 1);
}

static void open_conn(conn_t *c) {
    int fd;
    for (;;) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) fail("socket: %s", strerror(errno));
        int one = 1;
        /* No Nagle delay on the client side: each request is one write. */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (port_hi) {
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
            bind_source_port(fd);
        }
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 || errno == EINPROGRESS) break;
        /* That port's TIME_WAIT entry for this server is under a second old. */
        if (errno != EADDRNOTAVAIL || !port_hi) fail("connect: %s", strerror(errno));
        close(fd);
    }
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->t0 = now_ns();
    c->interest = EPOLLOUT;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) fail("epoll_ctl: %s", strerror(errno));
}

static void close_conn(conn_t *c) {
    close(c->fd); /* also removes it from the epoll set */
    c->fd = -1;
    c->state = ST_FREE;
}

static void try_send(conn_t *c) {
    while (c->sent < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->sent, c->out_len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            fail("send: %s", strerror(errno));
        }
        c->sent += (size_t)n;
    }
    /* Keep reading while a large request is still being sent: an echo server replies
       while it receives, and both sides must drain to make progress. */
    set_interest(c, EPOLLIN | (c->sent < c->out_len ? EPOLLOUT : 0));
}

static void begin(conn_t *c, int state, const char *out, size_t out_len, const char *exp,
                  size_t exp_len) {
    c->state = state;
    c->out = out;
    c->out_len = out_len;
    c->sent = 0;
    c->exp = exp;
    c->exp_len = exp_len;
    c->got = 0;
    try_send(c);
}

/* Reads what is there; returns 1 when the expected reply is complete. */
static int on_readable(conn_t *c) {
    ssize_t n = recv(c->fd, rbuf, RECV_BUF, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        fail("recv: %s", strerror(errno));
    }
    if (n == 0) fail("server closed a connection (%zu of %zu reply bytes read)", c->got, c->exp_len);
    if (c->got + (size_t)n > c->exp_len) fail("reply longer than expected (%zu bytes)", c->exp_len);
    if (memcmp(rbuf, c->exp + c->got, (size_t)n) != 0)
        fail("reply differs from the expected bytes at offset %zu", c->got);
    c->got += (size_t)n;
    return c->got == c->exp_len;
}

static void record(uint64_t t_done, conn_t *c) {
    if (!measuring) return;
    uint64_t v = t_done - c->t0;
    hist[bucket_of(v)]++;
    if (v > max_ns) max_ns = v;
    requests++;
    reply_bytes += c->exp_len;
}

/* Opens and pings every connection in conns[0..n), at most max_pending at a time. */
static void establish(int n, double limit_s) {
    int opened = 0, done = 0, pending = 0;
    uint64_t deadline = now_ns() + (uint64_t)(limit_s * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    while (done < n) {
        while (opened < n && pending < opt.max_pending) {
            open_conn(&conns[opened++]);
            pending++;
        }
        int ready = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        if (ready < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < ready; i++) {
            conn_t *c = &conns[evs[i].data.u32];
            if (c->state == ST_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) fail("connect: %s (after %d connections)", strerror(err), done);
                begin(c, ST_PING, PING, strlen(PING), ping_rep, ping_rep_len);
            } else if (c->state == ST_PING) {
                if ((evs[i].events & EPOLLOUT) && c->sent < c->out_len) try_send(c);
                if ((evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && on_readable(c)) {
                    c->state = ST_IDLE;
                    set_interest(c, EPOLLIN); /* a reply to nothing, or EOF, is an error */
                    pending--;
                    done++;
                }
            } else if (c->state == ST_IDLE) {
                char b;
                ssize_t r = recv(c->fd, &b, 1, 0);
                if (r == 0) fail("server closed an idle connection");
                if (r > 0) fail("data on an idle connection");
                if (errno != EAGAIN) fail("idle connection: %s", strerror(errno));
            }
        }
        if (now_ns() > deadline)
            fail("only %d of %d connections opened in %.0f s", done, n, limit_s);
    }
}

typedef struct {
    double window, cpu_self, cpu_server, wait, server_user, server_sys;
    cpustat_t before, after;
} usage_t;

static void print_result(double conn_s, const usage_t *u) {
    double w = u->window;
    printf("{\"mode\": \"%s\", \"connections\": %d, \"idle\": %d, \"size\": %zu, "
           "\"requests\": %llu, \"duration_s\": %.6f, \"rps\": %.1f, \"reply_bytes\": %llu, "
           "\"mbps\": %.3f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f, "
           "\"connect_s\": %.4f, \"loadgen_cpu\": %.3f, \"server_cpu\": %.3f, "
           "\"loadgen_wait\": %.3f, \"server_user_us\": %.3f, \"server_sys_us\": %.3f, "
           "\"cpu_busy\": [",
           opt.mode == MODE_RR ? "rr" : "connect", opt.conns, opt.idle, opt.size,
           (unsigned long long)requests, w, (double)requests / w, (unsigned long long)reply_bytes,
           (double)reply_bytes / w / 1e6, percentile_us(0.50), percentile_us(0.99),
           (double)max_ns / 1000.0, conn_s, u->cpu_self / w,
           u->cpu_server < 0 ? -1.0 : u->cpu_server / w, u->wait < 0 ? -1.0 : u->wait / w,
           u->cpu_server < 0 || !requests ? -1.0 : u->server_user / (double)requests * 1e6,
           u->cpu_server < 0 || !requests ? -1.0 : u->server_sys / (double)requests * 1e6);
    for (int i = 0; i < u->after.n && i < u->before.n; i++) {
        unsigned long long total = u->after.total[i] - u->before.total[i];
        double busy = total ? (double)(u->after.busy[i] - u->before.busy[i]) / (double)total : 0;
        printf("%s%.3f", i ? ", " : "", busy);
    }
    printf("]}\n");
    fflush(stdout);
}

/* Runs the measured loop of rr and connect modes. After the window it lets every
   request in flight finish, so that closing sends FIN rather than a reset, and the
   server sees the ordinary end of a client rather than an error. */
static void run_load(double conn_s) {
    struct epoll_event evs[MAX_EVENTS];
    uint64_t start = now_ns();
    uint64_t warm_end = start + (uint64_t)(opt.warmup * 1e9);
    uint64_t end = warm_end + (uint64_t)(opt.duration * 1e9);
    uint64_t drain_end = end + 2000000000u;
    double cpu0 = 0, srv0 = -1, wait0 = 0, user0 = 0, sys0 = 0, user1 = 0, sys1 = 0;
    usage_t u = {0};
    int first = opt.mode == MODE_RR ? opt.idle : 0;
    int inflight = opt.conns, stopping = 0;

    for (int i = first; i < first + opt.conns; i++) {
        conn_t *c = &conns[i];
        if (opt.mode == MODE_RR) {
            c->t0 = now_ns();
            begin(c, ST_ACTIVE, req, req_len, rep, rep_len);
        } else {
            open_conn(c);
        }
    }
    while (inflight > 0) {
        uint64_t t = now_ns();
        if (!measuring && !stopping && t >= warm_end) {
            measuring = 1;
            read_cpustat(&u.before);
            cpu0 = self_cpu_s();
            wait0 = self_wait_s();
            srv0 = opt.server_pid ? proc_times_s(opt.server_pid, &user0, &sys0) : -1;
        }
        if (!stopping && t >= end) {
            stopping = 1;
            measuring = 0;
            u.window = (double)(t - warm_end) / 1e9;
            u.cpu_self = self_cpu_s() - cpu0;
            u.wait = wait0 < 0 ? -1 : self_wait_s() - wait0;
            double srv1 = srv0 < 0 ? -1 : proc_times_s(opt.server_pid, &user1, &sys1);
            u.cpu_server = srv0 < 0 || srv1 < 0 ? -1 : srv1 - srv0;
            u.server_user = user1 - user0;
            u.server_sys = sys1 - sys0;
            read_cpustat(&u.after);
        }
        if (stopping && t >= drain_end) break;
        uint64_t next = stopping ? drain_end : measuring ? end : warm_end;
        int wait_ms = (int)((next - t) / 1000000u) + 1;
        int ready = epoll_wait(epfd, evs, MAX_EVENTS, wait_ms);
        if (ready < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < ready; i++) {
            conn_t *c = &conns[evs[i].data.u32];
            if (c->state == ST_IDLE) {
                if (!stopping) fail("event on an idle connection");
                continue;
            }
            if (c->state == ST_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) fail("connect: %s", strerror(err));
                begin(c, ST_ACTIVE, req, req_len, rep, rep_len); /* t0 stays at connect() */
                continue;
            }
            if ((evs[i].events & EPOLLOUT) && c->sent < c->out_len) try_send(c);
            if (!(evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) || !on_readable(c)) continue;
            uint64_t done = now_ns();
            record(done, c);
            if (opt.mode == MODE_CONNECT)
                close_conn(c); /* the client closes first, as a short-lived client does */
            if (stopping) {
                if (c->state == ST_ACTIVE) {
                    c->state = ST_IDLE;
                    set_interest(c, EPOLLIN);
                }
                inflight--;
            } else if (opt.mode == MODE_RR) {
                c->t0 = done;
                begin(c, ST_ACTIVE, req, req_len, rep, rep_len);
            } else {
                open_conn(c);
            }
        }
    }
    print_result(conn_s, &u);
}

static void run_hold(double conn_s) {
    printf("{\"mode\": \"hold\", \"ready\": true, \"connections\": %d, \"connect_s\": %.4f}\n",
           opt.conns, conn_s);
    fflush(stdout);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) < 0) fail("epoll_ctl stdin: %s", strerror(errno));
    int closed = 0;
    uint64_t deadline = now_ns() + (uint64_t)(opt.duration * 1e9);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        if (now_ns() > deadline) fail("hold: nobody closed stdin within %.0f s", opt.duration);
        int ready = epoll_wait(epfd, evs, MAX_EVENTS, 100);
        if (ready < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        for (int i = 0; i < ready; i++) {
            if (evs[i].data.u32 == STDIN_TAG) {
                char b[64];
                if (read(0, b, sizeof b) <= 0) {
                    printf("{\"mode\": \"hold\", \"closed_by_server\": %d}\n", closed);
                    fflush(stdout);
                    exit(0);
                }
                continue;
            }
            conn_t *c = &conns[evs[i].data.u32];
            char b[64];
            ssize_t r = recv(c->fd, b, sizeof b, 0);
            if (r > 0) fail("data on an idle connection");
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            close_conn(c); /* EOF or reset: the server closed it, as it does when stopping */
            closed++;
        }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: bench_load rr|connect|hold --port N [--host 127.0.0.1] [--proto echo|thanks]\n"
            "       [--size BYTES] [--conns N] [--idle N] [--duration S] [--warmup S]\n"
            "       [--server-pid PID] [--max-pending N] [--timeout S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    if (!strcmp(argv[1], "rr")) opt.mode = MODE_RR;
    else if (!strcmp(argv[1], "connect")) opt.mode = MODE_CONNECT;
    else if (!strcmp(argv[1], "hold")) opt.mode = MODE_HOLD;
    else usage();
    static struct option longopts[] = {
        {"host", 1, 0, 'h'},     {"port", 1, 0, 'p'},     {"proto", 1, 0, 'P'},
        {"size", 1, 0, 's'},     {"conns", 1, 0, 'c'},    {"idle", 1, 0, 'i'},
        {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'},   {"server-pid", 1, 0, 'S'},
        {"max-pending", 1, 0, 'm'}, {"timeout", 1, 0, 't'}, {0, 0, 0, 0}};
    int ch;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (ch) {
        case 'h': opt.host = optarg; break;
        case 'p': opt.port = atoi(optarg); break;
        case 'P':
            if (!strcmp(optarg, "thanks")) opt.thanks = 1;
            else if (strcmp(optarg, "echo")) usage();
            break;
        case 's': opt.size = (size_t)atol(optarg); break;
        case 'c': opt.conns = atoi(optarg); break;
        case 'i': opt.idle = atoi(optarg); break;
        case 'd': opt.duration = atof(optarg); break;
        case 'w': opt.warmup = atof(optarg); break;
        case 'S': opt.server_pid = atoi(optarg); break;
        case 'm': opt.max_pending = atoi(optarg); break;
        case 't': opt.timeout = atof(optarg); break;
        default: usage();
        }
    }
    if (opt.port <= 0 || opt.conns <= 0 || opt.size < 2 || opt.max_pending <= 0) usage();

    /* Traffic goes to this machine only. */
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &addr.sin_addr) != 1) fail("bad host");
    if ((ntohl(addr.sin_addr.s_addr) >> 24) != 127) fail("refusing a host outside 127.0.0.0/8");

    /* A bound on the whole run, in case the harness that started us is gone. */
    double limit = opt.timeout > 0 ? opt.timeout : opt.warmup + opt.duration + 120;
    alarm((unsigned)limit + 1);

    nconns = opt.conns + (opt.mode == MODE_RR ? opt.idle : 0);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconns + 16 > rl.rlim_cur)
        fail("%d connections need more file descriptors than the limit %llu", nconns,
             (unsigned long long)rl.rlim_cur);

    /* The request: printable bytes ending in a newline, so one buffer serves both
       protocols; the reply is what the protocol must send back for it. */
    req_len = opt.size;
    req = malloc(req_len);
    for (size_t i = 0; i < req_len - 1; i++) req[i] = (char)('a' + (i * 7 + i / 26) % 26);
    req[req_len - 1] = '\n';
    const char *prefix = opt.thanks ? THANKS_PREFIX : "";
    size_t plen = strlen(prefix);
    rep_len = plen + req_len;
    rep = malloc(rep_len);
    memcpy(rep, prefix, plen);
    memcpy(rep + plen, req, req_len);
    ping_rep_len = plen + strlen(PING);
    ping_rep = malloc(ping_rep_len);
    memcpy(ping_rep, prefix, plen);
    memcpy(ping_rep + plen, PING, strlen(PING));
    rbuf = malloc(RECV_BUF);

    if (opt.mode == MODE_CONNECT) {
        int lo = 0, hi = 0;
        FILE *f = fopen("/proc/sys/net/ipv4/ip_local_port_range", "r");
        if (f && fscanf(f, "%d %d", &lo, &hi) == 2 && lo > 20000) {
            port_lo = port_next = 10000;
            port_hi = lo;
        }
        if (f) fclose(f);
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    conns = calloc((size_t)nconns, sizeof *conns);
    for (int i = 0; i < nconns; i++) conns[i].fd = -1;

    uint64_t t = now_ns();
    if (opt.mode != MODE_CONNECT) establish(nconns, limit);
    double conn_s = (double)(now_ns() - t) / 1e9;
    if (opt.mode == MODE_HOLD) run_hold(conn_s);
    else run_load(conn_s);
    return 0;
}
