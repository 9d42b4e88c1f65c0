/*
 * bench_thread_thanks: the "Thank you for your message <line>" server with one thread
 * per client, the design of the C++ seed: an accept thread that polls the listening
 * socket and an eventfd used to ask it to stop, and a handler thread per connection.
 *
 * Usage: bench_thread_thanks [HOST [PORT]]   (default 127.0.0.1, port 0 = any free port)
 * Prints "Listening on HOST:PORT" once accepting; exits 0 on SIGTERM or SIGINT (the
 * stop handler the seed names as its own improvement).
 *
 * Unlike the seed, which answers whatever one recv() returned, it answers whole lines,
 * as aioserver's thanks protocol does, so the bench can check every reply byte.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE (64 * 1024) /* also the longest line served */
#define BACKLOG 100          /* asyncio.start_server's default */
#define PREFIX "Thank you for your message "
#define PREFIX_LEN (sizeof PREFIX - 1)

static int stop_fd;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void on_signal(int sig) {
    (void)sig;
    uint64_t one = 1;
    ssize_t n = write(stop_fd, &one, sizeof one); /* async-signal-safe */
    (void)n;
}

static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char in[BUF_SIZE]; /* on the thread's stack, as in the seed */
    size_t have = 0;
    char *out = NULL;
    size_t cap = 0;
    for (;;) {
        ssize_t r = recv(fd, in + have, BUF_SIZE - have, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            if (r == 0 && have > 0) { /* a last line without its newline */
                send_all(fd, PREFIX, PREFIX_LEN);
                send_all(fd, in, have);
                send_all(fd, "\n", 1);
            }
            break;
        }
        size_t end = have + (size_t)r, start = 0, olen = 0;
        char *nl;
        while ((nl = memchr(in + start, '\n', end - start)) != NULL) {
            size_t line = (size_t)(nl - in) + 1 - start;
            if (olen + PREFIX_LEN + line > cap) {
                cap = 2 * (olen + PREFIX_LEN + line);
                out = realloc(out, cap);
            }
            memcpy(out + olen, PREFIX, PREFIX_LEN);
            memcpy(out + olen + PREFIX_LEN, in + start, line);
            olen += PREFIX_LEN + line;
            start += line;
        }
        if (olen && send_all(fd, out, olen) < 0) break;
        memmove(in, in + start, end - start);
        have = end - start;
        if (have == BUF_SIZE) {
            static const char err[] = "Error: line longer than 65536 bytes\n";
            send_all(fd, err, sizeof err - 1);
            break;
        }
    }
    free(out);
    close(fd);
    return NULL;
}

int main(int argc, char **argv) {
    const char *host = argc > 1 ? argv[1] : "127.0.0.1";
    int port = argc > 2 ? atoi(argv[2]) : 0;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max; /* 10,000 clients need more than the usual 1,024 */
    setrlimit(RLIMIT_NOFILE, &rl);

    stop_fd = eventfd(0, EFD_CLOEXEC);
    if (stop_fd < 0) die("eventfd");
    struct sigaction sa_stop = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa_stop, NULL);
    sigaction(SIGINT, &sa_stop, NULL);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("inet_pton");
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, BACKLOG) < 0) die("listen");
    socklen_t salen = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &salen);
    printf("Listening on %s:%d\n", host, ntohs(sa.sin_port));
    fflush(stdout);

    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    struct pollfd fds[2] = {{.fd = stop_fd, .events = POLLIN}, {.fd = lfd, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("poll");
        }
        if (fds[0].revents) return 0; /* exit closes every socket, ends every thread */
        if (!fds[1].revents) continue;
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EMFILE || errno == ENFILE) usleep(10000);
            continue;
        }
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pthread_t tid;
        int err = pthread_create(&tid, &attr, serve, (void *)(intptr_t)cfd);
        if (err) {
            fprintf(stderr, "pthread_create: error %d\n", err);
            close(cfd);
        }
    }
}
