/*
 * bench_epoll_echo: a single-threaded epoll echo server, the practical limit that
 * scripts/bench measures the Python servers against.
 *
 * Usage: bench_epoll_echo [HOST [PORT]]   (default 127.0.0.1, port 0 = any free port)
 * Prints "Listening on HOST:PORT" once accepting; exits 0 on SIGTERM or SIGINT.
 *
 * Level-triggered, one recv per readiness event into one shared buffer, sent straight
 * back. Only bytes the client is not reading yet are kept per connection; while a
 * connection has such bytes it is not read from, so memory per client stays bounded.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE (64 * 1024) /* the same read size as every server in the bench */
#define BACKLOG 100          /* asyncio.start_server's default */
#define MAX_EVENTS 512

typedef struct {
    char *pending; /* bytes read but not yet sent back */
    size_t len, off;
} conn_t;

static conn_t *conns; /* indexed by fd */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void drop(int epfd, int fd) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    free(conns[fd].pending);
    conns[fd] = (conn_t){0};
}

static void watch(int epfd, int fd, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, op, fd, &ev) < 0) die("epoll_ctl");
}

/* Sends buf; keeps what the socket did not take. Returns -1 when the client is gone. */
static int send_or_keep(int epfd, int fd, const char *buf, size_t len) {
    size_t off = 0;
    while (off < len) {
        ssize_t n = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) return -1;
            conn_t *c = &conns[fd];
            c->pending = malloc(len - off);
            memcpy(c->pending, buf + off, len - off);
            c->len = len - off;
            c->off = 0;
            watch(epfd, fd, EPOLL_CTL_MOD, EPOLLOUT); /* stop reading until flushed */
            return 0;
        }
        off += (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *host = argc > 1 ? argv[1] : "127.0.0.1";
    int port = argc > 2 ? atoi(argv[2]) : 0;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* 10,000 clients need more than the usual 1,024 */
    setrlimit(RLIMIT_NOFILE, &rl);
    conns = calloc(rl.rlim_cur, sizeof *conns);

    /* Blocked signals reach the signalfd only if they are not ignored, and a shell
       that starts us in the background may have set SIGINT to be ignored. */
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigprocmask(SIG_BLOCK, &stop, NULL);
    int sfd = signalfd(-1, &stop, SFD_CLOEXEC);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("inet_pton");
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, BACKLOG) < 0) die("listen");
    socklen_t salen = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &salen);

    int epfd = epoll_create1(EPOLL_CLOEXEC);
    watch(epfd, lfd, EPOLL_CTL_ADD, EPOLLIN);
    watch(epfd, sfd, EPOLL_CTL_ADD, EPOLLIN);
    printf("Listening on %s:%d\n", host, ntohs(sa.sin_port));
    fflush(stdout);

    static char buf[BUF_SIZE];
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == sfd) return 0; /* exit closes every socket */
            if (fd == lfd) {
                for (;;) {
                    int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (cfd < 0) break; /* EAGAIN, or out of descriptors: retry on next event */
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    watch(epfd, cfd, EPOLL_CTL_ADD, EPOLLIN);
                }
                continue;
            }
            conn_t *c = &conns[fd];
            if (c->pending) {
                ssize_t w = send(fd, c->pending + c->off, c->len - c->off, MSG_NOSIGNAL);
                if (w < 0 && errno != EAGAIN && errno != EINTR) {
                    drop(epfd, fd);
                    continue;
                }
                if (w > 0) c->off += (size_t)w;
                if (c->off == c->len) {
                    free(c->pending);
                    *c = (conn_t){0};
                    watch(epfd, fd, EPOLL_CTL_MOD, EPOLLIN);
                }
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0 || send_or_keep(epfd, fd, buf, (size_t)r) < 0) drop(epfd, fd);
        }
    }
}
