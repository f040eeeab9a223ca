/* Microbenchmark for eBPF overhead: nanoseconds per syscall (getppid through syscall(2), never cached by libc)
 * and per context switch (two processes pinned to one CPU ping-ponging one byte over pipes: two switches per
 * round trip; pinning keeps cross-CPU wakeups, which a 2-core VM makes very noisy, out of the figure).
 * Usage: ebpf_work SYSCALLS ROUNDTRIPS -> prints "syscall_ns=<x> switch_ns=<y>". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    long rounds = argc > 2 ? atol(argv[2]) : 50000;
    double t0 = now_ns();
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
    double syscall_ns = (now_ns() - t0) / n;

    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(0, &one);
    sched_setaffinity(0, sizeof one, &one); /* inherited by the child */
    int ab[2], ba[2];
    if (pipe(ab) || pipe(ba)) return 1;
    char c = 0;
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < rounds; i++) {
            if (read(ab[0], &c, 1) != 1 || write(ba[1], &c, 1) != 1) _exit(1);
        }
        _exit(0);
    }
    t0 = now_ns();
    for (long i = 0; i < rounds; i++) {
        if (write(ab[1], &c, 1) != 1 || read(ba[0], &c, 1) != 1) return 1;
    }
    double switch_ns = (now_ns() - t0) / (2.0 * rounds);
    waitpid(child, NULL, 0);
    printf("syscall_ns=%.1f switch_ns=%.1f\n", syscall_ns, switch_ns);
    return 0;
}
