/*
 * fake_nvml.c - a stand-in libnvidia-ml.so.1 for machines without an NVIDIA GPU (a test double: nothing real
 * can run here). It exports the C symbols nvidia-ml-py resolves, with NVML's struct layouts, return codes and
 * two-call "query the size, then fill" conventions, so the real pynvml runs unchanged against it.
 *
 * GPUs, MIG devices, processes, samples and injected errors come from a text scenario file named by
 * $FAKE_NVML_SCENARIO, re-read whenever its mtime changes, so a test can change the scenario while the code
 * under test keeps its NVML session. One record per line, tab-separated key=value fields; write it with
 * tests/harness/fake_nvml (Scenario(...).write(path)), which documents every key.
 *
 *   driver  version=550.54.15  generation=0  loaded=1  util_buffer=0
 *   device  uuid=GPU-..  name=..  mem_total=..  mem_used=..  util_gpu=..  temp=..  power_mw=..  mig=0|1  lost=0|1 ...
 *   mig     dev=0  gi=1  ci=0  uuid=MIG-..  profile=1g.10gb  mem_total=..  mem_used=..  gpm=1:40,2:35
 *   proc    dev=0  pid=..  used_mem=..  type=compute|graphics|mps  sm=..  mem=..  enc=..  dec=..  ts=-1  util=1  gi=..
 *   xid     dev=0  code=79        (an XID error; delivered once to each event set that had the GPU registered
 *           before the line appeared: lines already there at registration are the past, as for the driver)
 *   fail    fn=nvmlDeviceGetTemperature|*  code=3  dev=-1  times=-1   ("*" and lost=1 also refuse
 *           nvmlDeviceGetHandleByIndex; times: only the next N matching calls fail, -1 every one)
 *
 * GPM (GPU performance metrics, Hopper and newer): a device line with gpm=<metric id>:<percent>,... supports GPM and
 * answers those metrics (any other id: NOT_SUPPORTED in its slot); without gpm= it is a GPU without GPM. A mig
 * line's gpm= is its GPU instance's (nvmlGpmMigSampleGet). nvmlGpmMetricsGet answers sample2's values, and refuses
 * (INVALID_ARGUMENT) two samples of different devices or instances (a reconfigured instance is another one), of
 * different driver sessions, or taken out of order.
 *
 * Driver reload: a change of `generation` invalidates every open NVML session (calls return UNINITIALIZED until
 * nvmlInit is called again), as a driver unload/reload does to a long-running agent. `loaded=0` makes nvmlInit
 * fail with DRIVER_NOT_LOADED.
 *
 * Introspection for tests (not NVML API): fakeNvmlCalls(fn) counts calls of one symbol, fakeNvmlLastSeen(dev)
 * is the lastSeenTimeStamp the last nvmlDeviceGetProcessUtilization call on GPU `dev` passed, fakeNvmlGpmSamples()
 * how many GPM samples are allocated and not freed, fakeNvmlEventSets() how many event sets.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>

typedef int nvmlReturn_t;
enum {
    OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3, NO_PERMISSION = 4, NOT_FOUND = 6,
    INSUFFICIENT_SIZE = 7, DRIVER_NOT_LOADED = 9, TIMEOUT = 10, GPU_IS_LOST = 15, ARGUMENT_VERSION_MISMATCH = 25, UNKNOWN = 999
};

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;
typedef struct { unsigned int pid; unsigned long long timeStamp; unsigned int smUtil, memUtil, encUtil, decUtil; } nvmlProcessUtilizationSample_t;
typedef struct { unsigned long long timeStamp; unsigned int pid, smUtil, memUtil, encUtil, decUtil, jpgUtil, ofaUtil; } nvmlProcessUtilizationInfo_v1_t;
typedef struct { unsigned int version, processSamplesCount; unsigned long long lastSeenTimeStamp; nvmlProcessUtilizationInfo_v1_t *procUtilArray; } nvmlProcessesUtilizationInfo_t;
typedef struct { char busIdLegacy[16]; unsigned int domain, bus, device, pciDeviceId, pciSubSystemId; char busId[32]; } nvmlPciInfo_t;
typedef union { double dVal; unsigned int uiVal; unsigned long ulVal; unsigned long long ullVal; long long sllVal; int siVal; unsigned short usVal; } nvmlValue_t;
typedef struct { uint32_t fieldId, scopeId; int64_t timestamp, latencyUsec; unsigned int valueType; nvmlReturn_t nvmlReturn; nvmlValue_t value; } nvmlFieldValue_t;
#define nvmlMemory_v2 0x02000028u
#define nvmlProcessesUtilizationInfo_v1 0x01000018u
#define NO_ID 0xFFFFFFFFu

#define MAXDEV 32
#define MAXMIG 64
#define MAXPROC 1024
#define MAXFAIL 64
#define MAXGPM 32
#define MAXXID 256

/* One GPU or one MIG device: handles point at these. */
typedef struct {
    int index, is_mig, parent, mig, lost, minor;
    char uuid[96], name[96], serial[32], busid[32], profile[32];
    unsigned int gi, ci, util_gpu, util_mem, util_enc, util_dec, temp, power_mw, power_limit_mw, pcie;
    unsigned int clock_sm, clock_mem, clock_gfx, nvlink_links;
    unsigned long long mem_total, mem_used, mem_reserved, energy_mj, throttle, ecc_corr, ecc_uncorr;
    unsigned long long pcie_tx, pcie_rx, nvlink_tx, nvlink_rx;
    unsigned int remap, remap_corr, remap_unc, remap_pending, remap_failed, pcie_replays;
    int mem_temp;                                     /* Celsius; 0: no memory temperature (field 82 NOT_SUPPORTED);
                                                         -1: answers 0, as a driver that cannot read it may */
    unsigned int temp_limit[4];                       /* thresholds by NVML type (shutdown, slowdown, mem max, gpu
                                                         max); 0: NOT_SUPPORTED */
    int gpm, ngpm;                                    /* GPM supported; how many metrics it answers */
    unsigned int gpm_id[MAXGPM]; double gpm_val[MAXGPM];
} ent_t;
typedef struct { int dev, type, util; unsigned int pid, sm, mem, enc, dec, gi, ci; unsigned long long used_mem; long long ts; } proc_t_;
enum { COMPUTE = 0, GRAPHICS = 1, MPS = 2 };

static struct {
    char driver[80]; long generation; int loaded, ndev, nmig, nproc, nfail; unsigned int util_buffer;
    ent_t dev[MAXDEV], mig[MAXMIG]; proc_t_ proc[MAXPROC];
    struct { char fn[96]; int code, dev, times; } fail[MAXFAIL];
    int nxid; struct { int dev; unsigned int code; } xid[MAXXID];
} S;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int refcount = 0;
static long init_generation = -1;
static struct timespec loaded_mtime;
static unsigned long long last_seen[MAXDEV];
static struct { char fn[64]; unsigned long long n; } calls[160];

static unsigned long long now_us(void) {
    struct timeval tv; gettimeofday(&tv, NULL);
    return (unsigned long long)tv.tv_sec * 1000000ULL + tv.tv_usec;
}
static const char *field(char *line, const char *key) {   /* value of key=... in a tab-separated line */
    size_t n = strlen(key);
    for (char *p = line; p && *p; p = strchr(p, '\t') ? strchr(p, '\t') + 1 : NULL)
        if (!strncmp(p, key, n) && p[n] == '=') return p + n + 1;
    return NULL;
}
static void copyval(char *dst, size_t cap, const char *v) {
    size_t i = 0;
    for (; v && v[i] && v[i] != '\t' && v[i] != '\n' && i + 1 < cap; i++) dst[i] = v[i];
    dst[i] = 0;
}
static unsigned long long num(char *line, const char *key, unsigned long long dflt) {
    const char *v = field(line, key); return v ? strtoull(v, NULL, 0) : dflt;
}
static long long snum(char *line, const char *key, long long dflt) {
    const char *v = field(line, key); return v ? strtoll(v, NULL, 0) : dflt;
}
static void count_call(const char *fn) {
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        if (!calls[i].fn[0]) { snprintf(calls[i].fn, sizeof calls[i].fn, "%s", fn); calls[i].n = 1; return; }
        if (!strcmp(calls[i].fn, fn)) { calls[i].n++; return; }
    }
}

/* gpm=<id>:<percent>,...: present means GPM is supported (possibly with no metric at all) */
static void parse_gpm(char *line, ent_t *e) {
    const char *v = field(line, "gpm");
    e->gpm = v != NULL; e->ngpm = 0;
    while (v && *v && *v != '\t' && *v != '\n' && e->ngpm < MAXGPM) {
        char *end;
        unsigned int id = strtoul(v, &end, 10);
        if (*end != ':') break;
        e->gpm_id[e->ngpm] = id; e->gpm_val[e->ngpm++] = strtod(end + 1, &end);
        v = *end == ',' ? end + 1 : end;
    }
}

/* (Re)load the scenario if the file changed; caller holds mu. */
static void reload(void) {
    const char *path = getenv("FAKE_NVML_SCENARIO");
    struct stat st;
    if (!path || stat(path, &st) != 0) return;
    if (st.st_mtim.tv_sec == loaded_mtime.tv_sec && st.st_mtim.tv_nsec == loaded_mtime.tv_nsec) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    memset(&S, 0, sizeof S);
    strcpy(S.driver, "550.54.15");
    S.loaded = 1;
    char line[2048];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "driver\t", 7)) {
            copyval(S.driver, sizeof S.driver, field(line, "version"));
            S.generation = snum(line, "generation", 0); S.loaded = num(line, "loaded", 1);
            S.util_buffer = num(line, "util_buffer", 0);
        } else if (!strncmp(line, "device\t", 7) && S.ndev < MAXDEV) {
            ent_t *d = &S.dev[S.ndev]; d->index = S.ndev++;
            copyval(d->uuid, sizeof d->uuid, field(line, "uuid")); copyval(d->name, sizeof d->name, field(line, "name"));
            copyval(d->serial, sizeof d->serial, field(line, "serial"));
            copyval(d->busid, sizeof d->busid, field(line, "pci_bus_id"));
            if (!d->busid[0]) snprintf(d->busid, sizeof d->busid, "00000000:%02X:00.0", 0x18 + d->index);
            d->minor = num(line, "minor", d->index);
            d->mem_total = num(line, "mem_total", 80ULL << 30); d->mem_used = num(line, "mem_used", 0);
            d->mem_reserved = num(line, "mem_reserved", 0);
            d->util_gpu = num(line, "util_gpu", 0); d->util_mem = num(line, "util_mem", 0);
            d->util_enc = num(line, "util_enc", 0); d->util_dec = num(line, "util_dec", 0);
            d->temp = num(line, "temp", 40); d->power_mw = num(line, "power_mw", 70000);
            d->power_limit_mw = num(line, "power_limit_mw", 700000); d->energy_mj = num(line, "energy_mj", 1000000);
            d->clock_sm = num(line, "clock_sm", 1980); d->clock_mem = num(line, "clock_mem", 2619);
            d->clock_gfx = num(line, "clock_gfx", 1980); d->throttle = num(line, "throttle", 0);
            d->ecc_corr = num(line, "ecc_corr", 0); d->ecc_uncorr = num(line, "ecc_uncorr", 0);
            d->pcie = num(line, "pcie", 1); d->pcie_tx = num(line, "pcie_tx", 0); d->pcie_rx = num(line, "pcie_rx", 0);
            d->nvlink_links = num(line, "nvlink_links", 0);
            d->nvlink_tx = num(line, "nvlink_tx", 0); d->nvlink_rx = num(line, "nvlink_rx", 0);
            d->mig = num(line, "mig", 0); d->lost = num(line, "lost", 0);
            parse_gpm(line, d);
            d->remap = num(line, "remap", 1); d->remap_corr = num(line, "remap_corr", 0);
            d->remap_unc = num(line, "remap_unc", 0); d->remap_pending = num(line, "remap_pending", 0);
            d->remap_failed = num(line, "remap_failed", 0); d->pcie_replays = num(line, "pcie_replays", 0);
            d->mem_temp = snum(line, "mem_temp", 0);
            d->temp_limit[0] = num(line, "temp_shutdown", 0); d->temp_limit[1] = num(line, "temp_slowdown", 0);
            d->temp_limit[2] = num(line, "temp_mem_max", 0); d->temp_limit[3] = num(line, "temp_gpu_max", 0);
            d->gi = d->ci = NO_ID; d->parent = -1;
        } else if (!strncmp(line, "mig\t", 4) && S.nmig < MAXMIG) {
            ent_t *m = &S.mig[S.nmig]; m->index = S.nmig++; m->is_mig = 1;
            m->parent = num(line, "dev", 0); m->gi = num(line, "gi", 0); m->ci = num(line, "ci", 0);
            copyval(m->uuid, sizeof m->uuid, field(line, "uuid")); copyval(m->profile, sizeof m->profile, field(line, "profile"));
            m->mem_total = num(line, "mem_total", 10ULL << 30); m->mem_used = num(line, "mem_used", 0);
            parse_gpm(line, m);
        } else if (!strncmp(line, "proc\t", 5) && S.nproc < MAXPROC) {
            proc_t_ *p = &S.proc[S.nproc++];
            const char *t = field(line, "type");
            p->dev = num(line, "dev", 0); p->pid = num(line, "pid", 0); p->used_mem = num(line, "used_mem", 0);
            p->type = t && !strncmp(t, "graphics", 8) ? GRAPHICS : t && !strncmp(t, "mps", 3) ? MPS : COMPUTE;
            p->sm = num(line, "sm", 0); p->mem = num(line, "mem", 0); p->enc = num(line, "enc", 0); p->dec = num(line, "dec", 0);
            p->ts = snum(line, "ts", -1); p->util = num(line, "util", 1);
            p->gi = num(line, "gi", NO_ID); p->ci = num(line, "ci", NO_ID);
        } else if (!strncmp(line, "xid\t", 4) && S.nxid < MAXXID) {
            S.xid[S.nxid].dev = num(line, "dev", 0); S.xid[S.nxid++].code = num(line, "code", 0);
        } else if (!strncmp(line, "fail\t", 5) && S.nfail < MAXFAIL) {
            copyval(S.fail[S.nfail].fn, sizeof S.fail[0].fn, field(line, "fn"));
            S.fail[S.nfail].dev = snum(line, "dev", -1);
            S.fail[S.nfail].times = snum(line, "times", -1);
            S.fail[S.nfail++].code = num(line, "code", UNKNOWN);
        }
    }
    fclose(f);
    /* MIG device names as the driver gives them: "<GPU name> MIG <profile>" */
    for (int i = 0; i < S.nmig; i++) {
        ent_t *m = &S.mig[i];
        if (m->parent >= 0 && m->parent < S.ndev) {
            snprintf(m->name, sizeof m->name, "%.60s MIG %.24s", S.dev[m->parent].name, m->profile);
            m->lost = S.dev[m->parent].lost;
        }
    }
    loaded_mtime = st.st_mtim;
}

static int gpu_index(ent_t *e) { return e->is_mig ? e->parent : e->index; }

/* Does injected failure i still fire? A `times` budget is spent one matching call at a time; caller holds mu. */
static int armed(int i) {
    if (S.fail[i].times == 0) return 0;
    if (S.fail[i].times > 0) S.fail[i].times--;
    return 1;
}

/* Common prologue: lock, reload, check the session, injected failures, handle validity, lost GPUs. */
static nvmlReturn_t enter(const char *fn, void *handle, ent_t **e) {
    pthread_mutex_lock(&mu);
    count_call(fn);
    reload();
    if (refcount <= 0 || init_generation != S.generation || !S.loaded) return UNINITIALIZED;
    int dev = -1;
    if (e) {
        *e = (ent_t *)handle;
        int is_dev = *e >= S.dev && *e < S.dev + S.ndev, is_mig = *e >= S.mig && *e < S.mig + S.nmig;
        if (!is_dev && !is_mig) return INVALID_ARGUMENT;
        dev = gpu_index(*e);
    }
    for (int i = 0; i < S.nfail; i++)
        if ((!strcmp(S.fail[i].fn, fn) || (e && !strcmp(S.fail[i].fn, "*"))) && (S.fail[i].dev < 0 || S.fail[i].dev == dev)
            && armed(i))
            return S.fail[i].code;
    if (e && (*e)->lost) return GPU_IS_LOST;
    return OK;
}
#define RET(x) do { nvmlReturn_t _r = (x); pthread_mutex_unlock(&mu); return _r; } while (0)
#define ENTER(h, d) do { nvmlReturn_t _e = enter(__func__, h, d); if (_e) RET(_e); } while (0)
#define GPU_ONLY(e) do { if ((e)->is_mig) RET(NOT_SUPPORTED); } while (0)

static nvmlReturn_t copystr(char *dst, unsigned int len, const char *src) {
    if (!dst) return INVALID_ARGUMENT;
    if (strlen(src) + 1 > len) return INSUFFICIENT_SIZE;
    strcpy(dst, src); return OK;
}

/* ---- session ---- */
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags; pthread_mutex_lock(&mu); count_call("nvmlInit"); reload();
    for (int i = 0; i < S.nfail; i++) if (!strcmp(S.fail[i].fn, "nvmlInit") && armed(i)) RET(S.fail[i].code);
    if (!S.loaded) RET(DRIVER_NOT_LOADED);
    if (init_generation != S.generation) { refcount = 0; init_generation = S.generation; memset(last_seen, 0, sizeof last_seen); }
    refcount++; RET(OK);
}
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&mu); reload();
    if (refcount <= 0 || init_generation != S.generation) RET(UNINITIALIZED);
    refcount--; RET(OK);
}
const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case OK: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case INVALID_ARGUMENT: return "Invalid Argument";
    case NOT_SUPPORTED: return "Not Supported";
    case NO_PERMISSION: return "Insufficient Permissions";
    case NOT_FOUND: return "Not Found";
    case INSUFFICIENT_SIZE: return "Insufficient Size";
    case DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case TIMEOUT: return "Timeout";
    case GPU_IS_LOST: return "GPU is lost";
    case ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* ---- system and enumeration ---- */
nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned int len) { ENTER(NULL, NULL); RET(copystr(v, len, S.driver)); }
nvmlReturn_t nvmlSystemGetNVMLVersion(char *v, unsigned int len) {
    ENTER(NULL, NULL); char buf[96]; snprintf(buf, sizeof buf, "12.%s", S.driver); RET(copystr(v, len, buf));
}
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { ENTER(NULL, NULL); if (!n) RET(INVALID_ARGUMENT); *n = S.ndev; RET(OK); }
nvmlReturn_t nvmlDeviceGetCount(unsigned int *n) { return nvmlDeviceGetCount_v2(n); }
/* As the driver does, the handle of GPU i is refused with that GPU's trouble: its injected failures (this symbol or
 * "*" with dev=i) and GPU_IS_LOST once it fell off the bus. */
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) {
    ENTER(NULL, NULL);
    if (!h || i >= (unsigned)S.ndev) RET(INVALID_ARGUMENT);
    for (int k = 0; k < S.nfail; k++)
        if ((!strcmp(S.fail[k].fn, __func__) || !strcmp(S.fail[k].fn, "*")) && (S.fail[k].dev < 0 || S.fail[k].dev == (int)i)
            && armed(k))
            RET(S.fail[k].code);
    if (S.dev[i].lost) RET(GPU_IS_LOST);
    *h = &S.dev[i]; RET(OK);
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int i, void **h) { return nvmlDeviceGetHandleByIndex_v2(i, h); }
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **h) {
    ENTER(NULL, NULL);
    if (!uuid || !h) RET(INVALID_ARGUMENT);
    for (int i = 0; i < S.ndev; i++) if (!strcmp(uuid, S.dev[i].uuid)) { *h = &S.dev[i]; RET(OK); }
    for (int i = 0; i < S.nmig; i++) if (!strcmp(uuid, S.mig[i].uuid)) { *h = &S.mig[i]; RET(OK); }
    RET(NOT_FOUND);
}

/* ---- identity ---- */
nvmlReturn_t nvmlDeviceGetIndex(void *h, unsigned int *i) { ent_t *d; ENTER(h, &d); if (!i) RET(INVALID_ARGUMENT); *i = gpu_index(d); RET(OK); }
nvmlReturn_t nvmlDeviceGetUUID(void *h, char *u, unsigned int len) { ent_t *d; ENTER(h, &d); RET(copystr(u, len, d->uuid)); }
nvmlReturn_t nvmlDeviceGetName(void *h, char *n, unsigned int len) { ent_t *d; ENTER(h, &d); RET(copystr(n, len, d->name)); }
nvmlReturn_t nvmlDeviceGetSerial(void *h, char *n, unsigned int len) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!d->serial[0]) RET(NOT_SUPPORTED); RET(copystr(n, len, d->serial));
}
nvmlReturn_t nvmlDeviceGetMinorNumber(void *h, unsigned int *m) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!m) RET(INVALID_ARGUMENT); *m = d->minor; RET(OK); }
nvmlReturn_t nvmlDeviceGetPciInfo_v3(void *h, nvmlPciInfo_t *p) {
    ent_t *d; ENTER(h, &d); if (!p) RET(INVALID_ARGUMENT);
    ent_t *g = d->is_mig ? &S.dev[d->parent] : d;
    memset(p, 0, sizeof *p);
    snprintf(p->busId, sizeof p->busId, "%s", g->busid); snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%.15s", g->busid + 4);
    unsigned int dom = 0, bus = 0, dv = 0, fn = 0;
    sscanf(g->busid, "%x:%x:%x.%x", &dom, &bus, &dv, &fn);
    p->domain = dom; p->bus = bus; p->device = dv; p->pciDeviceId = 0x233010DE; p->pciSubSystemId = 0x16C110DE;
    RET(OK);
}
nvmlReturn_t nvmlDeviceGetPciInfo_v2(void *h, nvmlPciInfo_t *p) { return nvmlDeviceGetPciInfo_v3(h, p); }

/* ---- memory and utilization ---- */
nvmlReturn_t nvmlDeviceGetMemoryInfo(void *h, nvmlMemory_t *m) {
    ent_t *d; ENTER(h, &d); if (!m) RET(INVALID_ARGUMENT);
    m->total = d->mem_total; m->used = d->mem_used + d->mem_reserved; m->free = d->mem_total - m->used; RET(OK);
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *h, nvmlMemory_v2_t *m) {
    ent_t *d; ENTER(h, &d); if (!m) RET(INVALID_ARGUMENT);
    if (m->version != nvmlMemory_v2) RET(ARGUMENT_VERSION_MISMATCH);
    m->total = d->mem_total; m->reserved = d->mem_reserved; m->used = d->mem_used;
    m->free = d->mem_total - d->mem_used - d->mem_reserved; RET(OK);
}
/* Device-level utilization is not available on MIG devices nor on a GPU in MIG mode (as on A100/H100). */
nvmlReturn_t nvmlDeviceGetUtilizationRates(void *h, nvmlUtilization_t *u) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (d->mig) RET(NOT_SUPPORTED); if (!u) RET(INVALID_ARGUMENT);
    u->gpu = d->util_gpu; u->memory = d->util_mem; RET(OK);
}
nvmlReturn_t nvmlDeviceGetEncoderUtilization(void *h, unsigned int *u, unsigned int *period) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!u || !period) RET(INVALID_ARGUMENT); *u = d->util_enc; *period = 167000; RET(OK);
}
nvmlReturn_t nvmlDeviceGetDecoderUtilization(void *h, unsigned int *u, unsigned int *period) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!u || !period) RET(INVALID_ARGUMENT); *u = d->util_dec; *period = 167000; RET(OK);
}

/* ---- health, power, clocks ---- */
nvmlReturn_t nvmlDeviceGetTemperature(void *h, int sensor, unsigned int *t) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!t || sensor != 0) RET(INVALID_ARGUMENT); *t = d->temp; RET(OK);
}
nvmlReturn_t nvmlDeviceGetTemperatureThreshold(void *h, int type, unsigned int *t) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!t || type < 0) RET(INVALID_ARGUMENT);
    if (type > 3 || !d->temp_limit[type]) RET(NOT_SUPPORTED);
    *t = d->temp_limit[type]; RET(OK);
}
nvmlReturn_t nvmlDeviceGetPowerUsage(void *h, unsigned int *p) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!p) RET(INVALID_ARGUMENT); *p = d->power_mw; RET(OK); }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *h, unsigned int *p) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!p) RET(INVALID_ARGUMENT); *p = d->power_limit_mw; RET(OK); }
nvmlReturn_t nvmlDeviceGetPowerManagementLimit(void *h, unsigned int *p) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!p) RET(INVALID_ARGUMENT); *p = d->power_limit_mw; RET(OK); }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *h, unsigned long long *e) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!e) RET(INVALID_ARGUMENT); *e = d->energy_mj; RET(OK); }
nvmlReturn_t nvmlDeviceGetClockInfo(void *h, int type, unsigned int *c) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!c) RET(INVALID_ARGUMENT);
    switch (type) { case 0: *c = d->clock_gfx; break; case 1: *c = d->clock_sm; break; case 2: *c = d->clock_mem; break;
                    case 3: *c = 1755; break; default: RET(INVALID_ARGUMENT); }
    RET(OK);
}
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(void *h, unsigned long long *r) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!r) RET(INVALID_ARGUMENT); *r = d->throttle; RET(OK); }
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(void *h, unsigned long long *r) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!r) RET(INVALID_ARGUMENT); *r = d->throttle; RET(OK); }
nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *h, int type, int counter, unsigned long long *n) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!n || type < 0 || type > 1 || counter < 0 || counter > 1) RET(INVALID_ARGUMENT);
    *n = type == 0 ? d->ecc_corr : d->ecc_uncorr; RET(OK);
}
/* KB/s over a 20 ms window on real drivers (blocking); here the counter divided by an arbitrary second. */
nvmlReturn_t nvmlDeviceGetPcieThroughput(void *h, int counter, unsigned int *v) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d);
    if (!d->pcie) RET(NOT_SUPPORTED);
    if (!v) RET(INVALID_ARGUMENT);
    *v = (unsigned int)((counter == 0 ? d->pcie_tx : d->pcie_rx) / 1024); RET(OK);
}
nvmlReturn_t nvmlDeviceGetNvLinkState(void *h, unsigned int link, unsigned int *active) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!active) RET(INVALID_ARGUMENT);
    if (link >= d->nvlink_links) RET(NOT_SUPPORTED);
    *active = 1; RET(OK);
}
/* Field values: PCIe byte counters (197/198), NVLink link count (91) and per-link KiB counters (138/139). */
nvmlReturn_t nvmlDeviceGetFieldValues(void *h, int n, nvmlFieldValue_t *v) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!v || n < 0) RET(INVALID_ARGUMENT);
    unsigned long long ts = now_us();
    for (int i = 0; i < n; i++) {
        nvmlFieldValue_t *f = &v[i];
        f->timestamp = ts; f->latencyUsec = 0; f->valueType = 3; f->nvmlReturn = OK; f->value.ullVal = 0;
        char asked[32]; snprintf(asked, sizeof asked, "field %u", f->fieldId); count_call(asked);  /* field_reads(lib, id) */
        switch (f->fieldId) {
        case 82:
            if (!d->mem_temp) f->nvmlReturn = NOT_SUPPORTED;
            else { f->valueType = 1; f->value.uiVal = d->mem_temp < 0 ? 0 : (unsigned int)d->mem_temp; }
            break;
        case 197: case 198:
            if (!d->pcie) f->nvmlReturn = NOT_SUPPORTED;
            else f->value.ullVal = f->fieldId == 197 ? d->pcie_tx : d->pcie_rx;
            break;
        case 91: f->valueType = 1; f->value.uiVal = d->nvlink_links; break;
        case 138: case 139:
            if (!d->nvlink_links) f->nvmlReturn = NOT_SUPPORTED;
            else if (f->scopeId >= d->nvlink_links) f->nvmlReturn = INVALID_ARGUMENT;
            else f->value.ullVal = (f->fieldId == 138 ? d->nvlink_tx : d->nvlink_rx) / d->nvlink_links;
            break;
        default: f->nvmlReturn = NOT_SUPPORTED;
        }
    }
    RET(OK);
}

/* Row remapping (A100 and newer; remap=0: not supported) and the PCIe replay counter. */
nvmlReturn_t nvmlDeviceGetRemappedRows(void *h, unsigned int *corr, unsigned int *unc, unsigned int *pending, unsigned int *failed) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!d->remap) RET(NOT_SUPPORTED);
    if (!corr || !unc || !pending || !failed) RET(INVALID_ARGUMENT);
    *corr = d->remap_corr; *unc = d->remap_unc; *pending = d->remap_pending; *failed = d->remap_failed; RET(OK);
}
nvmlReturn_t nvmlDeviceGetPcieReplayCounter(void *h, unsigned int *v) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!d->pcie) RET(NOT_SUPPORTED); if (!v) RET(INVALID_ARGUMENT);
    *v = d->pcie_replays; RET(OK);
}

/* ---- events: XID errors only ---- */
#define XID_CRITICAL 0x8ULL
typedef struct { void *device; unsigned long long eventType, eventData; unsigned int gpuInstanceId, computeInstanceId; } nvmlEventData_t;
/* seen: xid lines of the GPU already past; generation: the driver's when the set was made (a reload ends the set) */
typedef struct { int registered[MAXDEV], seen[MAXDEV]; long generation; } evset_t;
static long evsets_live = 0;
static int xids_of(int dev) { int n = 0; for (int i = 0; i < S.nxid; i++) n += S.xid[i].dev == dev; return n; }
nvmlReturn_t nvmlEventSetCreate(evset_t **out) {
    ENTER(NULL, NULL); if (!out) RET(INVALID_ARGUMENT);
    *out = calloc(1, sizeof **out); if (!*out) RET(UNKNOWN);
    (*out)->generation = S.generation; evsets_live++; RET(OK);
}
nvmlReturn_t nvmlDeviceRegisterEvents(void *h, unsigned long long types, evset_t *set) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!set) RET(INVALID_ARGUMENT);
    if (set->generation != S.generation) RET(UNINITIALIZED);
    if (types & ~XID_CRITICAL) RET(NOT_SUPPORTED);
    if (!set->registered[d->index]) set->seen[d->index] = xids_of(d->index);
    set->registered[d->index] = 1; RET(OK);
}
nvmlReturn_t nvmlEventSetWait_v2(evset_t *set, nvmlEventData_t *data, unsigned int timeoutms) {
    (void)timeoutms; ENTER(NULL, NULL); if (!set || !data) RET(INVALID_ARGUMENT);
    if (set->generation != S.generation) RET(UNINITIALIZED);
    for (int dev = 0; dev < S.ndev; dev++) {
        if (!set->registered[dev] || xids_of(dev) <= set->seen[dev]) continue;
        for (int i = 0, k = 0; i < S.nxid; i++) {
            if (S.xid[i].dev != dev || k++ < set->seen[dev]) continue;
            set->seen[dev]++;
            *data = (nvmlEventData_t){ &S.dev[dev], XID_CRITICAL, S.xid[i].code, NO_ID, NO_ID };
            RET(OK);
        }
    }
    RET(TIMEOUT);
}
nvmlReturn_t nvmlEventSetFree(evset_t *set) {
    pthread_mutex_lock(&mu); count_call(__func__); if (!set) RET(INVALID_ARGUMENT);
    free(set); evsets_live--; RET(OK);
}

/* ---- MIG ---- */
nvmlReturn_t nvmlDeviceGetMigMode(void *h, unsigned int *cur, unsigned int *pend) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!cur || !pend) RET(INVALID_ARGUMENT); *cur = *pend = d->mig; RET(OK);
}
nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(void *h, unsigned int *n) { ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!n) RET(INVALID_ARGUMENT); *n = d->mig ? 7 : 0; RET(OK); }
nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(void *h, unsigned int idx, void **out) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!out) RET(INVALID_ARGUMENT);
    if (!d->mig) RET(NOT_SUPPORTED);
    unsigned int k = 0;
    for (int i = 0; i < S.nmig; i++) if (S.mig[i].parent == d->index) { if (k++ == idx) { *out = &S.mig[i]; RET(OK); } }
    RET(idx < 7 ? NOT_FOUND : INVALID_ARGUMENT);
}
nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(void *h, void **out) {
    ent_t *d; ENTER(h, &d); if (!out || !d->is_mig) RET(INVALID_ARGUMENT); *out = &S.dev[d->parent]; RET(OK);
}
nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *h, unsigned int *is) { ent_t *d; ENTER(h, &d); if (!is) RET(INVALID_ARGUMENT); *is = d->is_mig; RET(OK); }
nvmlReturn_t nvmlDeviceGetGpuInstanceId(void *h, unsigned int *id) { ent_t *d; ENTER(h, &d); if (!id) RET(INVALID_ARGUMENT); if (!d->is_mig) RET(INVALID_ARGUMENT); *id = d->gi; RET(OK); }
nvmlReturn_t nvmlDeviceGetComputeInstanceId(void *h, unsigned int *id) { ent_t *d; ENTER(h, &d); if (!id) RET(INVALID_ARGUMENT); if (!d->is_mig) RET(INVALID_ARGUMENT); *id = d->ci; RET(OK); }

/* ---- processes: "*count too small (or infos NULL) -> INSUFFICIENT_SIZE with *count = needed" ---- */
static int proc_on(proc_t_ *p, ent_t *d) {
    if (d->is_mig) return p->dev == d->parent && p->gi == d->gi && (p->ci == NO_ID || p->ci == d->ci);
    return p->dev == d->index;
}
static nvmlReturn_t procs(ent_t *d, int type, unsigned int *count, void *out, int v1) {
    if (!count) return INVALID_ARGUMENT;
    unsigned int n = 0;
    for (int i = 0; i < S.nproc; i++) if (proc_on(&S.proc[i], d) && S.proc[i].type == type) n++;
    if (n == 0) { *count = 0; return OK; }
    if (!out || *count < n) { *count = n; return INSUFFICIENT_SIZE; }
    unsigned int k = 0;
    for (int i = 0; i < S.nproc; i++) {
        proc_t_ *p = &S.proc[i];
        if (!proc_on(p, d) || p->type != type) continue;
        if (v1) { nvmlProcessInfo_v1_t *o = (nvmlProcessInfo_v1_t *)out + k++; o->pid = p->pid; o->usedGpuMemory = p->used_mem; }
        else { nvmlProcessInfo_t *o = (nvmlProcessInfo_t *)out + k++; o->pid = p->pid; o->usedGpuMemory = p->used_mem;
               o->gpuInstanceId = p->gi; o->computeInstanceId = p->ci; }
    }
    *count = n; return OK;
}
#define PROCFN(name, type, v1) \
    nvmlReturn_t name(void *h, unsigned int *c, void *infos) { ent_t *d; ENTER(h, &d); RET(procs(d, type, c, infos, v1)); }
PROCFN(nvmlDeviceGetComputeRunningProcesses_v3, COMPUTE, 0)
PROCFN(nvmlDeviceGetComputeRunningProcesses_v2, COMPUTE, 0)
PROCFN(nvmlDeviceGetComputeRunningProcesses, COMPUTE, 1)
PROCFN(nvmlDeviceGetGraphicsRunningProcesses_v3, GRAPHICS, 0)
PROCFN(nvmlDeviceGetGraphicsRunningProcesses_v2, GRAPHICS, 0)
PROCFN(nvmlDeviceGetGraphicsRunningProcesses, GRAPHICS, 1)
PROCFN(nvmlDeviceGetMPSComputeRunningProcesses_v3, MPS, 0)
PROCFN(nvmlDeviceGetMPSComputeRunningProcesses_v2, MPS, 0)
PROCFN(nvmlDeviceGetMPSComputeRunningProcesses, MPS, 1)

/* Per-process utilization samples newer than lastSeen; NOT_FOUND when there are none (as the driver does).
 * ts=-1 (the default) is a process busy right now: its sample carries the time of the call. Not supported on
 * MIG devices nor on a GPU in MIG mode. */
static unsigned long long sample_ts(proc_t_ *p, unsigned long long now) { return p->ts < 0 ? now : (unsigned long long)p->ts; }
static unsigned int newer(ent_t *d, unsigned long long last, unsigned long long now) {
    unsigned int n = 0;
    for (int i = 0; i < S.nproc; i++) if (S.proc[i].dev == d->index && S.proc[i].util && sample_ts(&S.proc[i], now) > last) n++;
    return n;
}
nvmlReturn_t nvmlDeviceGetProcessUtilization(void *h, nvmlProcessUtilizationSample_t *out, unsigned int *count, unsigned long long last) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (d->mig) RET(NOT_SUPPORTED); if (!count) RET(INVALID_ARGUMENT);
    last_seen[d->index] = last;
    unsigned long long now = now_us();
    unsigned int n = newer(d, last, now);
    /* util_buffer: as driver 580 on an H200 answered, the size query always asks for the whole sample buffer,
       and only the read says NOT_FOUND when no sample is newer */
    if (!out && S.util_buffer) { *count = n > S.util_buffer ? n : S.util_buffer; RET(INSUFFICIENT_SIZE); }
    if (n == 0) RET(NOT_FOUND);
    if (!out || *count < n) { *count = n; RET(INSUFFICIENT_SIZE); }
    unsigned int k = 0;
    for (int i = 0; i < S.nproc; i++) {
        proc_t_ *p = &S.proc[i];
        unsigned long long ts = sample_ts(p, now);
        if (p->dev != d->index || !p->util || ts <= last) continue;
        out[k++] = (nvmlProcessUtilizationSample_t){ p->pid, ts, p->sm, p->mem, p->enc, p->dec };
    }
    *count = n; RET(OK);
}
nvmlReturn_t nvmlDeviceGetProcessesUtilizationInfo(void *h, nvmlProcessesUtilizationInfo_t *info) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (d->mig) RET(NOT_SUPPORTED); if (!info) RET(INVALID_ARGUMENT);
    if (info->version != nvmlProcessesUtilizationInfo_v1) RET(ARGUMENT_VERSION_MISMATCH);
    unsigned long long now = now_us(), last = info->lastSeenTimeStamp;
    last_seen[d->index] = last;
    unsigned int n = newer(d, last, now);
    if (n == 0) RET(NOT_FOUND);
    if (!info->procUtilArray || info->processSamplesCount < n) { info->processSamplesCount = n; RET(INSUFFICIENT_SIZE); }
    unsigned int k = 0;
    for (int i = 0; i < S.nproc; i++) {
        proc_t_ *p = &S.proc[i];
        unsigned long long ts = sample_ts(p, now);
        if (p->dev != d->index || !p->util || ts <= last) continue;
        info->procUtilArray[k++] = (nvmlProcessUtilizationInfo_v1_t){ ts, p->pid, p->sm, p->mem, p->enc, p->dec, 0, 0 };
    }
    info->processSamplesCount = n; RET(OK);
}

/* ---- GPM: samples hold what their device or GPU instance answered when taken; metrics compare two ---- */
typedef struct { unsigned int version, isSupportedDevice; } nvmlGpmSupport_t;
typedef struct {
    unsigned int metricId; nvmlReturn_t nvmlReturn; double value;
    struct { char *shortName, *longName, *unit; } metricInfo;
} nvmlGpmMetric_t;
/* uuid: the GPU's, or the first MIG device's of the instance (new at a reconfiguration); generation: the driver's */
typedef struct gpm_sample {
    int filled; char uuid[96]; long generation; unsigned long long seq; int n; unsigned int id[MAXGPM]; double val[MAXGPM];
} gpm_sample_t;
typedef struct { unsigned int version, numMetrics; gpm_sample_t *sample1, *sample2; nvmlGpmMetric_t metrics[]; } nvmlGpmMetricsGet_t;
static unsigned long long gpm_seq = 0;
static long gpm_live = 0;

nvmlReturn_t nvmlGpmQueryDeviceSupport(void *h, nvmlGpmSupport_t *sup) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!sup) RET(INVALID_ARGUMENT);
    if (sup->version != 1) RET(ARGUMENT_VERSION_MISMATCH);
    sup->isSupportedDevice = d->gpm; RET(OK);
}
nvmlReturn_t nvmlGpmSampleAlloc(gpm_sample_t **out) {
    ENTER(NULL, NULL); if (!out) RET(INVALID_ARGUMENT);
    *out = calloc(1, sizeof **out); if (!*out) RET(UNKNOWN);
    gpm_live++; RET(OK);
}
/* a sample is the caller's memory: freed whatever became of the session */
nvmlReturn_t nvmlGpmSampleFree(gpm_sample_t *smp) {
    pthread_mutex_lock(&mu); count_call(__func__); if (!smp) RET(INVALID_ARGUMENT);
    free(smp); gpm_live--; RET(OK);
}
static nvmlReturn_t take(ent_t *src, gpm_sample_t *smp) {
    if (!smp) return INVALID_ARGUMENT;
    smp->filled = 1; smp->seq = ++gpm_seq; smp->n = src->ngpm; smp->generation = S.generation;
    memcpy(smp->uuid, src->uuid, sizeof smp->uuid);
    memcpy(smp->id, src->gpm_id, sizeof smp->id); memcpy(smp->val, src->gpm_val, sizeof smp->val);
    return OK;
}
/* The whole GPU: not in MIG mode (its instances are sampled one by one there). */
nvmlReturn_t nvmlGpmSampleGet(void *h, gpm_sample_t *smp) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!d->gpm || d->mig) RET(NOT_SUPPORTED); RET(take(d, smp));
}
nvmlReturn_t nvmlGpmMigSampleGet(void *h, unsigned int gi, gpm_sample_t *smp) {
    ent_t *d; ENTER(h, &d); GPU_ONLY(d); if (!d->gpm || !d->mig) RET(NOT_SUPPORTED);
    for (int i = 0; i < S.nmig; i++) if (S.mig[i].parent == d->index && S.mig[i].gi == gi) RET(take(&S.mig[i], smp));
    RET(NOT_FOUND);
}
nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *mg) {
    ENTER(NULL, NULL); if (!mg) RET(INVALID_ARGUMENT);
    if (mg->version != 1) RET(ARGUMENT_VERSION_MISMATCH);
    gpm_sample_t *a = mg->sample1, *b = mg->sample2;
    /* two samples of one GPU or GPU instance, in order, in one driver session */
    if (!a || !b || !a->filled || !b->filled || a->seq >= b->seq || strcmp(a->uuid, b->uuid) || a->generation != b->generation)
        RET(INVALID_ARGUMENT);
    for (unsigned int i = 0; i < mg->numMetrics; i++) {
        nvmlGpmMetric_t *m = &mg->metrics[i];
        m->nvmlReturn = NOT_SUPPORTED; m->value = 0;
        m->metricInfo.shortName = m->metricInfo.longName = m->metricInfo.unit = NULL;
        for (int k = 0; k < b->n; k++) if (b->id[k] == m->metricId) { m->nvmlReturn = OK; m->value = b->val[k]; }
    }
    RET(OK);
}

/* ---- test introspection (not NVML API) ---- */
unsigned long long fakeNvmlCalls(const char *fn) {
    unsigned long long n = 0;
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < sizeof calls / sizeof calls[0] && calls[i].fn[0]; i++) if (!strcmp(calls[i].fn, fn)) n = calls[i].n;
    pthread_mutex_unlock(&mu);
    return n;
}
unsigned long long fakeNvmlLastSeen(unsigned int dev) {
    pthread_mutex_lock(&mu);
    unsigned long long v = dev < MAXDEV ? last_seen[dev] : 0;
    pthread_mutex_unlock(&mu);
    return v;
}
long fakeNvmlGpmSamples(void) {
    pthread_mutex_lock(&mu);
    long v = gpm_live;
    pthread_mutex_unlock(&mu);
    return v;
}
long fakeNvmlEventSets(void) {
    pthread_mutex_lock(&mu);
    long v = evsets_live;
    pthread_mutex_unlock(&mu);
    return v;
}
