/*
 * bench_pthread_echo: an echo server with one pthread per client, the design of the
 * first seed (a blocking accept loop that starts a thread for each connection).
 *
 * Usage: bench_pthread_echo [HOST [PORT]]   (default 127.0.0.1, port 0 = any free port)
 * Prints "Listening on HOST:PORT" once accepting. It has no stop handler, like the
 * seed: SIGTERM ends the process at once.
 *
 * Changes from the seed, none of which alter the design: threads are detached (the seed
 * never joins them, so each finished client would keep its stack), there is no print
 * per connection, the read buffer is the bench's common 64 KiB, and TCP_NODELAY is set
 * as asyncio sets it, so Nagle's algorithm is not what gets measured.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE (64 * 1024)
#define BACKLOG 100 /* the seed's value, and asyncio.start_server's default */

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *serve(void *arg) {
    int fd = (int)(intptr_t)arg;
    char buf[BUF_SIZE]; /* on the thread's stack, as in the seed */
    for (;;) {
        ssize_t r = recv(fd, buf, BUF_SIZE, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        ssize_t off = 0;
        while (off < r) {
            ssize_t w = send(fd, buf + off, (size_t)(r - off), MSG_NOSIGNAL);
            if (w < 0 && errno == EINTR) continue;
            if (w < 0) goto done;
            off += w;
        }
    }
done:
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
    for (;;) {
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE) { usleep(10000); continue; }
            die("accept");
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
