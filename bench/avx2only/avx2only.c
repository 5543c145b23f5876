/*
 * avx2only.so: run a program's AVX2 code paths on a CPU that has AVX-512.
 *
 * Loaded with LD_PRELOAD, it turns on CPUID faulting for the process
 * (arch_prctl ARCH_SET_CPUID, Linux >= 4.12, and a CPU or hypervisor with the
 * `cpuid_fault` flag).  Every CPUID instruction then traps; the SIGSEGV handler
 * runs the real CPUID with faulting briefly off and hands back the answer with
 * the AVX-512, AMX and AVX-VNNI feature bits cleared, as an AVX2-only CPU
 * (e.g. AMD Zen 2/3) reports them.  Libraries that dispatch on CPUID (torch's
 * cpuinfo, onnxruntime's MLAS, oneDNN, MKL, OpenBLAS, numpy) then pick their
 * AVX2 kernels.  glibc picks its string functions before any constructor runs:
 * set GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD
 * beside it (bench/avx2only/run does both).
 *
 * The setting survives fork and clone (threads, children) and is reset by
 * execve, where LD_PRELOAD loads this library again.  It is a bench tool for
 * developers without an AVX2 machine: it reproduces the code paths, not the
 * clock, caches or memory of an AVX2 CPU.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_GET_CPUID
#define ARCH_GET_CPUID 0x1011
#define ARCH_SET_CPUID 0x1012
#endif

static struct sigaction previous;

static void cpuid_raw(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid"
                     : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
                     : "a"(leaf), "c"(sub));
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        r[1] &= ~((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) |
                  (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31));
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14));
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23,
           AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) |
                  (1u << 24) | (1u << 25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23 */
        r[0] &= ~((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23));
        /* EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX10 19 */
        r[3] &= ~((1u << 4) | (1u << 5) | (1u << 8) | (1u << 19));
    } else if (leaf == 0xd && sub == 0) {
        /* XSAVE components offered: drop opmask/ZMM (5-7) and AMX tiles (17-18) */
        r[0] &= ~((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18));
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *g = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)g[REG_RIP];
    /* a trapped CPUID is a general-protection fault (SI_KERNEL), where RIP is readable;
       a page fault (SEGV_MAPERR, SEGV_ACCERR) may be at RIP itself */
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t r[4];
        uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        cpuid_raw(leaf, sub, r);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        mask(leaf, sub, r);
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    /* A real fault: hand it to whoever had the signal before us, or die of it. */
    if (previous.sa_flags & SA_SIGINFO && previous.sa_sigaction) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        signal(SIGSEGV, SIG_DFL);
        raise(SIGSEGV);
    }
}

/* Keep our handler first: a later sigaction(SIGSEGV) (faulthandler, a JIT)
   becomes the handler we chain real faults to. */
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction(void) {
    static sigaction_fn real;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    return real;
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig == SIGSEGV) {
        if (old) *old = previous;
        if (act) previous = *act;
        return 0;
    }
    return real_sigaction()(sig, act, old);
}

__attribute__((constructor)) static void avx2only_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    /* installed through the real libc, not the wrapper above */
    if (real_sigaction()(SIGSEGV, &sa, &previous) != 0 ||
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        fprintf(stderr, "avx2only: CPUID faulting is not available here "
                        "(no cpuid_fault flag?); running unmasked is refused\n");
        _exit(111);
    }
}
