/*
 * snapvm test guest: ring-3 workloads.
 *
 * Everything in this file except exception_handler() runs at CPL 3 with
 * IOPL=3, natively fast under the emulating KVM backend. The serial protocol
 * is documented in guest-images/README.md.
 */
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define MAX_CPUS 64
#define PAGE_SIZE 4096ull
#define AREA_MIN_BASE (16ull << 20)
#define SERIAL_PORT 0x3f8
#define EXIT_PORT 0x501

/* Status values written to EXIT_PORT. */
#define STATUS_OK 0
#define STATUS_VERIFY_FAILED 1
#define STATUS_BAD_ARGS 2
#define STATUS_EXCEPTION 3
#define STATUS_NO_CPUS 4

struct hvm_start_info {
    u32 magic;
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_memmap_entry {
    u64 addr;
    u64 size;
    u32 type;
    u32 reserved;
};

struct pvclock {
    u32 version;
    u32 pad0;
    u64 tsc_timestamp;
    u64 system_time;
    u32 tsc_to_system_mul;
    int8_t tsc_shift;
    u8 flags;
    u8 pad[2];
};

struct trap_frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

extern volatile u64 pvh_start_info;
extern volatile u32 kvmclock_ok;
extern volatile struct pvclock pvclock_area;
extern char _end[];
extern void sys_halt(void) __attribute__((noreturn));
extern char sys_halt_ud[];
extern void halt_forever(void) __attribute__((noreturn));
extern void sys_probe(u64 with_cmpxchg16b);
extern char sys_probe_ud[];
extern void ring0_probe(u64 with_cmpxchg16b);
extern char probe_after_int3[];
static volatile u32 breakpoints_seen;

/* gcc may emit calls to these even with -ffreestanding. */
void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline void outw(u16 port, u16 v)
{
    __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* ---------------------------------------------------------------- */
/* Serial output, one line at a time under a spin lock.              */
/* ---------------------------------------------------------------- */

static volatile u32 print_lock;

static void lock_print(void)
{
    while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
}

/* Bounded variant for the exception path: never deadlock on a lock the
 * faulting CPU itself may hold. */
static void lock_print_bounded(void)
{
    for (u32 i = 0; i < 1000000; i++)
        if (!__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE))
            return;
}

static void unlock_print(void)
{
    __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE);
}

static void putc_(char c)
{
    outb(SERIAL_PORT, (u8)c);
}

static void puts_(const char *s)
{
    while (*s)
        putc_(*s++);
}

static void put_dec(u64 v)
{
    char buf[24];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        putc_(buf[--i]);
}

static void put_hex(u64 v)
{
    puts_("0x");
    int started = 0;
    for (int s = 60; s >= 0; s -= 4) {
        u32 d = (v >> s) & 0xf;
        if (d || started || s == 0) {
            putc_("0123456789abcdef"[d]);
            started = 1;
        }
    }
}

static void guest_exit(u8 status)
{
    outb(EXIT_PORT, status);
}

/* ---------------------------------------------------------------- */
/* Time from kvmclock (registered by the BSP in ring 0).             */
/* ---------------------------------------------------------------- */

/* This CPU's index (ring 0 points FS at cpu_local[cpu]). */
static inline u32 this_cpu(void)
{
    u64 cpu;
    __asm__ volatile("movq %%fs:0, %0" : "=r"(cpu));
    return (u32)cpu;
}

/* Time from this CPU's own kvmclock page: KVM refreshes it before the CPU
 * runs again (e.g. after a snapshot restore), so it never goes backwards. */
static u64 now_ns(void)
{
    if (!kvmclock_ok)
        return rdtsc(); /* no kvmclock: a rough ns stand-in (TSC ~ GHz) */
    volatile struct pvclock *pv =
        (volatile struct pvclock *)((volatile u8 *)&pvclock_area + 64 * this_cpu());
    u32 v;
    u64 ns;
    do {
        v = pv->version;
        __asm__ volatile("" ::: "memory");
        u64 delta = rdtsc() - pv->tsc_timestamp;
        int8_t shift = pv->tsc_shift;
        if (shift < 0)
            delta >>= -shift;
        else
            delta <<= shift;
        ns = pv->system_time + (u64)(((unsigned __int128)delta * pv->tsc_to_system_mul) >> 32);
        __asm__ volatile("" ::: "memory");
    } while ((v & 1) || v != pv->version);
    return ns;
}

/* ---------------------------------------------------------------- */
/* Command line                                                      */
/* ---------------------------------------------------------------- */

static const char *cmdline = "";

/* Finds the n-th (0-based) "key=" as a whole word; returns a pointer to
 * the value or 0. */
static const char *arg_nth(const char *key, u32 n)
{
    const char *p = cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *k = key;
        const char *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k && *q == '=' && n-- == 0)
            return q + 1;
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

/* Finds the first "key=" as a whole word. */
static const char *arg(const char *key)
{
    return arg_nth(key, 0);
}

/* How many times "key=" occurs. */
static u32 arg_count(const char *key)
{
    u32 n = 0;
    while (arg_nth(key, n))
        n++;
    return n;
}

static int arg_is(const char *key, const char *value)
{
    const char *v = arg(key);
    if (!v)
        return 0;
    while (*value && *v == *value) {
        v++;
        value++;
    }
    return !*value && (*v == ' ' || *v == 0);
}

/* Parses a decimal (or 0x-prefixed hex) number; *ok = 0 on junk. */
static u64 arg_u64(const char *key, u64 dflt, int *ok)
{
    const char *v = arg(key);
    if (!v)
        return dflt;
    u64 r = 0;
    int base = 10, digits = 0;
    if (v[0] == '0' && v[1] == 'x') {
        base = 16;
        v += 2;
    }
    for (; *v && *v != ' '; v++, digits++) {
        u32 d;
        if (*v >= '0' && *v <= '9')
            d = (u32)(*v - '0');
        else if (base == 16 && *v >= 'a' && *v <= 'f')
            d = (u32)(*v - 'a' + 10);
        else {
            *ok = 0;
            return dflt;
        }
        r = r * (u64)base + d;
    }
    if (!digits)
        *ok = 0;
    return r;
}

static void put_arg(const char *key)
{
    const char *v = arg(key);
    if (!v) {
        puts_("none");
        return;
    }
    while (*v && *v != ' ')
        putc_(*v++);
}

/* ---------------------------------------------------------------- */
/* Memory map and vCPU discovery                                      */
/* ---------------------------------------------------------------- */

#define MAX_RANGES 16
struct range {
    u64 base;
    u64 pages;
};
static struct range area[MAX_RANGES];
static u32 area_ranges;
static u64 ram_bytes;

/* Fills `out` (at most MAX_RANGES ranges, count in *nout) with usable RAM
 * above max(16 MiB, end of image), in memory-map order: the first
 * `skip_pages` pages of it are left out, then up to `want_pages` pages are
 * taken. Returns the pages taken. */
static u64 build_ranges(const struct hvm_start_info *si, u64 skip_pages, u64 want_pages,
                        struct range *out, u32 *nout)
{
    u64 floor = ((u64)_end + (2ull << 20) - 1) & ~((2ull << 20) - 1);
    if (floor < AREA_MIN_BASE)
        floor = AREA_MIN_BASE;
    u64 got = 0;
    *nout = 0;
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries && *nout < MAX_RANGES && got < want_pages; i++) {
        if (e[i].type != 1)
            continue;
        u64 start = e[i].addr, end = e[i].addr + e[i].size;
        if (start < floor)
            start = floor;
        start = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        end &= ~(PAGE_SIZE - 1);
        if (end > (16ull << 30))
            end = 16ull << 30; /* the identity map covers 16 GiB */
        if (end <= start)
            continue;
        u64 pages = (end - start) / PAGE_SIZE;
        if (skip_pages >= pages) {
            skip_pages -= pages;
            continue;
        }
        start += skip_pages * PAGE_SIZE;
        pages -= skip_pages;
        skip_pages = 0;
        if (pages > want_pages - got)
            pages = want_pages - got;
        out[*nout].base = start;
        out[*nout].pages = pages;
        (*nout)++;
        got += pages;
    }
    return got;
}

/* Builds the memstamp area: RAM above max(16 MiB, end of image), up to
 * `want_pages` pages. Returns the pages found. */
static u64 build_area(const struct hvm_start_info *si, u64 want_pages)
{
    return build_ranges(si, 0, want_pages, area, &area_ranges);
}

static u64 total_ram(const struct hvm_start_info *si)
{
    u64 total = 0;
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (e[i].type == 1)
            total += e[i].size;
    return total;
}

/* Page `page` of the pages the ranges r[0..n) hold, in order. */
static volatile u64 *ranges_page_addr(const struct range *r, u32 n, u64 page)
{
    for (u32 i = 0; i < n; i++) {
        if (page < r[i].pages)
            return (volatile u64 *)(r[i].base + page * PAGE_SIZE);
        page -= r[i].pages;
    }
    return 0;
}

static volatile u64 *page_addr(u64 page)
{
    return ranges_page_addr(area, area_ranges, page);
}

static u32 mp_count_cpus(void)
{
    static const u64 ranges[][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}};
    for (u32 r = 0; r < 2; r++) {
        for (u64 a = ranges[r][0]; a < ranges[r][1]; a += 16) {
            const volatile u8 *p = (const volatile u8 *)a;
            if (p[0] != '_' || p[1] != 'M' || p[2] != 'P' || p[3] != '_')
                continue;
            u32 cfg = *(const volatile u32 *)(a + 4);
            if (!cfg)
                return 1;
            const volatile u8 *c = (const volatile u8 *)(u64)cfg;
            if (c[0] != 'P' || c[1] != 'C' || c[2] != 'M' || c[3] != 'P')
                return 1;
            u16 entries = *(const volatile u16 *)(c + 34);
            const volatile u8 *ent = c + 44;
            u32 cpus = 0;
            for (u16 i = 0; i < entries; i++) {
                if (ent[0] == 0) {
                    if (ent[3] & 1)
                        cpus++;
                    ent += 20;
                } else {
                    ent += 8;
                }
            }
            return cpus ? cpus : 1;
        }
    }
    return 1;
}

/* ---------------------------------------------------------------- */
/* vCPU 0 polling hook: network, generation, keep region (further    */
/* down)                                                             */
/* ---------------------------------------------------------------- */

/* net_on: set once vCPU 0 has brought the virtio-net device up (ip=
 * given). vmgen_on: set after READY if a generation device answered at
 * boot. keep_on: set after READY with keep_mib= (the region is checked
 * every 10 s). Only vCPU 0 ever polls, so vcpu0_poll() is called only on
 * vCPU 0's paths: the memstamp page and rate-throttle loops (cpu 0), the
 * wait for every disk request (so between disk blocks too), the idle loop
 * and after a finished workload. With none of them it is a test of three
 * flags that are never set. */
static int net_on;
static int vmgen_on;
static int keep_on;
static void vcpu0_poll_slow(void);

static inline void vcpu0_poll(void)
{
    if (net_on | vmgen_on | keep_on)
        vcpu0_poll_slow();
}

/* Due before `t` (or the timer is implausibly far ahead, e.g. after a
 * clock change): true, and the timer is set `every` ns past `t`. */
static int timer_due(u64 *when, u64 t, u64 every)
{
    if ((int64_t)(t - *when) >= 0 || *when - t > 2 * every) {
        *when = t + every;
        return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- */
/* memstamp                                                          */
/* ---------------------------------------------------------------- */

static u64 seed;
static u64 rate_mibps;
static u64 passes;
static u64 area_pages;
static u64 disk_blocks;
static int with_disk;
static u32 ncpus;
static volatile u32 cpus_online;
static volatile u32 cpus_done;
static volatile u32 go;
static volatile u32 failed;

static inline u64 mix64(u64 z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The stamp of word i of `page` at generation `gen`; generation 0 is the
 * all-zero page the guest finds at boot. */
static inline u64 stamp_base(u64 page, u64 gen)
{
    return mix64(seed ^ (page * 0x9e3779b97f4a7c15ull) ^ (gen * 0xd6e8feb86659fd93ull)) | 1;
}

static inline u64 stamp_word(u64 base, u64 i)
{
    return base ^ (i * 0x2545f4914f6cdd1dull);
}

static void report_mismatch(u32 cpu, u64 page, u64 gen, u64 word, u64 expected, u64 found)
{
    lock_print();
    puts_("TESTGUEST FAIL vcpu=");
    put_dec(cpu);
    puts_(" workload=memstamp page=");
    put_dec(page);
    puts_(" addr=");
    put_hex((u64)page_addr(page) + word * 8);
    puts_(" expected_gen=");
    put_dec(gen);
    puts_(" word=");
    put_dec(word);
    puts_(" expected=");
    put_hex(expected);
    puts_(" found=");
    put_hex(found);
    /* Name the generation found, if it is a recent one. */
    for (u64 g = gen > 4 ? gen - 4 : 0; g <= gen + 4; g++) {
        u64 e = g ? stamp_word(stamp_base(page, g), word) : 0;
        if (e == found && g != gen) {
            puts_(" found_gen=");
            put_dec(g);
            break;
        }
    }
    puts_("\n");
    unlock_print();
}

/* One memstamp pass as vCPU `cpu` over pages [first, last): checks that
 * every page holds generation gen - 1, writes generation `gen` and prints
 * the PASS line. */
static void memstamp_pass(u32 cpu, u64 first, u64 last, u64 gen)
{
    u64 bytes_per_ns_budget = rate_mibps; /* MiB/s per vCPU, 0 = unlimited */
    u64 t0 = now_ns();
    for (u64 page = first; page < last; page++) {
        volatile u64 *p = page_addr(page);
        u64 old = gen > 1 ? stamp_base(page, gen - 1) : 0;
        u64 new = stamp_base(page, gen);
        for (u64 i = 0; i < PAGE_SIZE / 8; i++) {
            u64 expect = gen > 1 ? stamp_word(old, i) : 0;
            u64 found = p[i];
            if (found != expect) {
                report_mismatch(cpu, page, gen - 1, i, expect, found);
                __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
                guest_exit(STATUS_VERIFY_FAILED);
                sys_halt();
            }
            p[i] = stamp_word(new, i);
        }
        if (cpu == 0)
            vcpu0_poll(); /* vCPU 0: network and generation between pages */
        if (bytes_per_ns_budget && ((page - first) & 15) == 15) {
            u64 done = (page - first + 1) * PAGE_SIZE;
            u64 due = done * 1000000000ull / (bytes_per_ns_budget << 20);
            while (now_ns() - t0 < due) {
                if (cpu == 0)
                    vcpu0_poll();
                cpu_relax();
            }
        }
    }
    u64 dt = now_ns() - t0;
    u64 bytes = (last - first) * PAGE_SIZE;
    lock_print();
    puts_("TESTGUEST PASS vcpu=");
    put_dec(cpu);
    puts_(" gen=");
    put_dec(gen);
    puts_(" pages=");
    put_dec(last - first);
    puts_(" ns=");
    put_dec(dt);
    puts_(" mibps=");
    put_dec(dt ? bytes * 1000000000ull / dt >> 20 : 0);
    puts_("\n");
    unlock_print();
}

/* Runs memstamp as worker `worker` of `workers` (the share of the area). */
static void memstamp(u32 cpu, u32 worker, u32 workers)
{
    u64 first = area_pages * worker / workers;
    u64 last = area_pages * (worker + 1) / workers;
    for (u64 gen = 1; passes == 0 || gen <= passes; gen++)
        memstamp_pass(cpu, first, last, gen);
}

/* ---------------------------------------------------------------- */
/* virtio-mmio block driver (polling, one request at a time)         */
/* ---------------------------------------------------------------- */

#define VQ_SIZE 8
#define DISK_BLOCK 4096ull
#define MAX_DISK_BLOCKS (1u << 20) /* blocks x disks: one shared generation table */
#define MAX_DISKS 4

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

/* One virtio-blk device: its virtqueue (each ring on its own page), its
 * request header and status byte, and the driver's state. It all lives in
 * guest memory, so a snapshot captures it at the same instant as the
 * device model's side of the queue. */
struct vdisk {
    struct vq_desc desc[VQ_SIZE] __attribute__((aligned(4096)));
    struct {
        u16 flags;
        u16 idx;
        u16 ring[VQ_SIZE];
        u16 used_event;
    } avail __attribute__((aligned(4096)));
    struct {
        u16 flags;
        u16 idx;
        struct {
            u32 id;
            u32 len;
        } ring[VQ_SIZE];
        u16 avail_event;
    } used __attribute__((aligned(4096)));
    struct {
        u32 type;
        u32 reserved;
        u64 sector;
    } hdr __attribute__((aligned(4096)));
    volatile u8 status __attribute__((aligned(64)));
    volatile u32 *vio; /* MMIO registers (the address of virtio_mmio.device=) */
    u64 base;
    u32 irq; /* its interrupt line (the driver polls; recorded for messages) */
    u64 sectors;
    u16 last_used;
};

static struct vdisk disks[MAX_DISKS];
static u32 ndisks; /* the first ndisks block devices (DeviceID 2) are driven */
static u8 blk_buf[DISK_BLOCK] __attribute__((aligned(4096)));
/* Expected generation of every block: disk d's table is
 * disk_gen[d * disk_blocks .. (d + 1) * disk_blocks). */
static u32 disk_gen[MAX_DISK_BLOCKS];

static u32 vio_read(const struct vdisk *k, u32 off)
{
    return k->vio[off / 4];
}

static void vio_write(const struct vdisk *k, u32 off, u32 v)
{
    k->vio[off / 4] = v;
}

static void disk_fail(u32 d, const char *what, u64 a, u64 b)
{
    lock_print();
    puts_("TESTGUEST FAIL workload=diskstamp ");
    puts_(what);
    puts_(" ");
    put_hex(a);
    puts_(" ");
    put_hex(b);
    puts_(" disk=");
    put_dec(d);
    puts_("\n");
    unlock_print();
    __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
    guest_exit(STATUS_VERIFY_FAILED);
    sys_halt();
}

/* Parses the n-th (0-based) virtio_mmio.device=<size>@<addr>:<irq>
 * argument; returns 0 if it is missing or malformed. */
static int virtio_mmio_device(u32 n, u64 *base, u32 *irq)
{
    const char *v = arg_nth("virtio_mmio.device", n);
    if (!v)
        return 0;
    while (*v && *v != '@' && *v != ' ')
        v++;
    if (*v != '@')
        return 0;
    v++;
    u64 r = 0;
    if (v[0] == '0' && v[1] == 'x')
        v += 2;
    for (; *v && *v != ':' && *v != ' '; v++) {
        u32 d;
        if (*v >= '0' && *v <= '9')
            d = (u32)(*v - '0');
        else if (*v >= 'a' && *v <= 'f')
            d = (u32)(*v - 'a' + 10);
        else if (*v >= 'A' && *v <= 'F')
            d = (u32)(*v - 'A' + 10);
        else
            return 0;
        r = r * 16 + d;
    }
    u32 i = 0;
    if (*v == ':')
        for (v++; *v >= '0' && *v <= '9'; v++)
            i = i * 10 + (u32)(*v - '0');
    *base = r;
    *irq = i;
    return r != 0;
}

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2

/* Finds the k-th (0-based) virtio_mmio.device= entry whose DeviceID
 * register (offset 0x08) reads `id`: block devices are 2, network
 * adapters 1. Reads the DeviceID of the entries up to that one only, and
 * nothing else. Returns 0 if there are fewer such entries. */
static int virtio_mmio_find(u32 id, u32 k, u64 *base, u32 *irq)
{
    u32 entries = arg_count("virtio_mmio.device");
    for (u32 n = 0; n < entries; n++) {
        if (!virtio_mmio_device(n, base, irq))
            continue;
        if (((volatile u32 *)*base)[0x08 / 4] == id && k-- == 0)
            return 1;
    }
    return 0;
}

/* How many of the virtio_mmio.device= entries are of type `id`, counting
 * up to `enough` at most. */
static u32 virtio_mmio_count(u32 id, u32 enough)
{
    u32 n = 0;
    u64 base;
    u32 irq;
    while (n < enough && virtio_mmio_find(id, n, &base, &irq))
        n++;
    return n;
}

/* Initialises disk d: the d-th virtio_mmio.device= entry whose DeviceID is
 * 2 (block), so network adapters listed among them change nothing. */
static void disk_init(u32 d)
{
    struct vdisk *k = &disks[d];
    if (!virtio_mmio_find(VIRTIO_ID_BLOCK, d, &k->base, &k->irq))
        disk_fail(d, "no virtio_mmio.device= on the command line", 0, 0);
    for (u32 e = 0; e < d; e++)
        if (disks[e].base == k->base)
            disk_fail(d, "two virtio_mmio.device= entries at", k->base, e);
    k->vio = (volatile u32 *)k->base;
    if (vio_read(k, 0) != 0x74726976 || vio_read(k, 4) != 2 || vio_read(k, 8) != 2)
        disk_fail(d, "no virtio 1.x block device at", k->base, vio_read(k, 8));
    vio_write(k, 0x70, 0);
    vio_write(k, 0x70, 1);     /* ACKNOWLEDGE */
    vio_write(k, 0x70, 1 | 2); /* DRIVER */
    vio_write(k, 0x14, 1);
    if (!(vio_read(k, 0x10) & 1))
        disk_fail(d, "device does not offer VIRTIO_F_VERSION_1", 0, 0);
    vio_write(k, 0x24, 1);
    vio_write(k, 0x20, 1); /* VERSION_1 */
    vio_write(k, 0x24, 0);
    vio_write(k, 0x20, 1u << 9); /* FLUSH */
    vio_write(k, 0x70, 1 | 2 | 8);
    if (!(vio_read(k, 0x70) & 8))
        disk_fail(d, "device refused our features", vio_read(k, 0x70), 0);
    vio_write(k, 0x30, 0);
    if (vio_read(k, 0x34) < VQ_SIZE)
        disk_fail(d, "queue too small", vio_read(k, 0x34), VQ_SIZE);
    vio_write(k, 0x38, VQ_SIZE);
    vio_write(k, 0x80, (u32)(u64)&k->desc);
    vio_write(k, 0x84, (u32)((u64)&k->desc >> 32));
    vio_write(k, 0x90, (u32)(u64)&k->avail);
    vio_write(k, 0x94, (u32)((u64)&k->avail >> 32));
    vio_write(k, 0xa0, (u32)(u64)&k->used);
    vio_write(k, 0xa4, (u32)((u64)&k->used >> 32));
    vio_write(k, 0x44, 1);
    vio_write(k, 0x70, 1 | 2 | 8 | 4); /* DRIVER_OK */
    k->sectors = (u64)vio_read(k, 0x100) | ((u64)vio_read(k, 0x104) << 32);
    k->last_used = k->used.idx;
}

/* One request on disk d: type 0 read / 1 write / 4 flush of one DISK_BLOCK. */
static void disk_request(u32 d, u32 type, u64 block)
{
    struct vdisk *k = &disks[d];
    k->hdr.type = type;
    k->hdr.reserved = 0;
    k->hdr.sector = block * (DISK_BLOCK / 512);
    k->status = 0xff;
    k->desc[0] = (struct vq_desc){(u64)&k->hdr, 16, 1, 1};
    if (type == 4) {
        k->desc[0].next = 2;
    } else {
        k->desc[1] = (struct vq_desc){(u64)blk_buf, DISK_BLOCK, (u16)(1 | (type == 0 ? 2 : 0)), 2};
    }
    k->desc[2] = (struct vq_desc){(u64)&k->status, 1, 2, 0};
    u16 idx = k->avail.idx;
    k->avail.ring[idx % VQ_SIZE] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)&k->avail.idx = (u16)(idx + 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    vio_write(k, 0x50, 0);
    u64 t0 = now_ns();
    u16 last = k->last_used, seen;
    while ((seen = *(volatile u16 *)&k->used.idx) == last) {
        if (now_ns() - t0 > 10000000000ull)
            disk_fail(d, "request timed out: type/block", type, block);
        vcpu0_poll(); /* only ever called on vCPU 0 */
        cpu_relax();
    }
    k->last_used++;
    vio_write(k, 0x64, vio_read(k, 0x60)); /* ack any interrupt status */
    if (k->status != 0) {
        lock_print();
        puts_("TESTGUEST FAIL workload=diskstamp request failed: type=");
        put_dec(type);
        puts_(" block=");
        put_dec(block);
        puts_(" status=");
        put_dec(k->status);
        puts_(" used_len=");
        put_dec(k->used.ring[(u16)(k->last_used - 1) % VQ_SIZE].len);
        puts_(" used_idx=");
        put_dec(k->used.idx);
        puts_(" avail_idx=");
        put_dec(k->avail.idx);
        puts_(" last_used=");
        put_dec(last);
        puts_(" seen_used=");
        put_dec(seen);
        puts_(" last_used_now=");
        put_dec(*(volatile u16 *)&k->last_used);
        puts_(" status_now=");
        put_dec(k->status);
        puts_(" at=");
        put_hex((u64)&k->last_used);
        puts_(",");
        put_hex((u64)&k->status);
        puts_(",");
        put_hex((u64)&k->used);
        puts_(" disk=");
        put_dec(d);
        puts_("\n");
        unlock_print();
        __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
        guest_exit(STATUS_VERIFY_FAILED);
        sys_halt();
    }
}

/* The stamp of block b of disk d at generation g (disk 0's is the one the
 * single-disk guest always used; other disks differ, so a disk served in
 * another's place is caught). */
static inline u64 disk_stamp_base(u32 d, u64 b, u64 g)
{
    return stamp_base(b ^ 0x8000000000000000ull ^ ((u64)d << 40), g);
}

/* One diskstamp pass (generation `pass`) over disk d: checks every block
 * against the generation table, writes the next generation, flushes, and
 * prints the PASS line. */
static void diskstamp_disk(u32 d, u64 blocks, u64 pass)
{
    u32 *gen = disk_gen + (u64)d * blocks;
    u64 t0 = now_ns();
    for (u64 b = 0; b < blocks; b++) {
        u32 g = gen[b];
        disk_request(d, 0, b);
        const u64 *w = (const u64 *)blk_buf;
        u64 base = g ? disk_stamp_base(d, b, g) : 0;
        for (u64 i = 0; i < DISK_BLOCK / 8; i++) {
            u64 expect = g ? stamp_word(base, i) : 0;
            if (w[i] != expect) {
                lock_print();
                puts_("TESTGUEST FAIL vcpu=0 workload=diskstamp block=");
                put_dec(b);
                puts_(" expected_gen=");
                put_dec(g);
                puts_(" word=");
                put_dec(i);
                puts_(" expected=");
                put_hex(expect);
                puts_(" found=");
                put_hex(w[i]);
                /* Name the generation (and the disk, if another) found. */
                for (u32 n = 0; n < ndisks; n++) {
                    u32 e = (d + n) % ndisks, k;
                    for (k = g > 4 ? g - 4 : 0; k <= g + 4; k++) {
                        u64 s = k ? stamp_word(disk_stamp_base(e, b, k), i) : 0;
                        if (s == w[i] && (k != g || e != d) && (k || e == d))
                            break;
                    }
                    if (k <= g + 4) {
                        puts_(" found_gen=");
                        put_dec(k);
                        if (e != d) {
                            puts_(" found_disk=");
                            put_dec(e);
                        }
                        break;
                    }
                }
                puts_(" disk=");
                put_dec(d);
                puts_("\n");
                unlock_print();
                __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
                guest_exit(STATUS_VERIFY_FAILED);
                sys_halt();
            }
        }
        u64 nb = disk_stamp_base(d, b, g + 1);
        u64 *o = (u64 *)blk_buf;
        for (u64 i = 0; i < DISK_BLOCK / 8; i++)
            o[i] = stamp_word(nb, i);
        disk_request(d, 1, b);
        gen[b] = g + 1;
    }
    disk_request(d, 4, 0);
    u64 dt = now_ns() - t0;
    lock_print();
    puts_("TESTGUEST PASS vcpu=0 workload=diskstamp gen=");
    put_dec(pass);
    puts_(" blocks=");
    put_dec(blocks);
    puts_(" ns=");
    put_dec(dt);
    puts_(" disk=");
    put_dec(d);
    puts_("\n");
    unlock_print();
}

/* One diskstamp pass over every driven disk, in order. */
/* adopt=1: a disk that holds stamps already (a fresh boot on the disk of
 * an earlier run, e.g. after its VM's hardware changed) is taken as it is:
 * each block's generation is the one its first word names (searched up to
 * ADOPT_MAX_GEN), checked over the whole block. */
#define ADOPT_MAX_GEN (1u << 20)
static void disk_adopt(u32 d, u64 blocks)
{
    u32 *gen = disk_gen + (u64)d * blocks;
    for (u64 b = 0; b < blocks; b++) {
        disk_request(d, 0, b);
        const u64 *w = (const u64 *)blk_buf;
        u32 g = 0;
        if (w[0] != 0) {
            for (g = 1; g < ADOPT_MAX_GEN; g++)
                if (stamp_word(disk_stamp_base(d, b, g), 0) == w[0])
                    break;
            if (g == ADOPT_MAX_GEN)
                disk_fail(d, "adopt: no stamp of this disk in block", b, w[0]);
        }
        u64 base = g ? disk_stamp_base(d, b, g) : 0;
        for (u64 i = 0; i < DISK_BLOCK / 8; i++)
            if (w[i] != (g ? stamp_word(base, i) : 0))
                disk_fail(d, "adopt: torn stamp in block", b, i);
        gen[b] = g;
    }
}

static void diskstamp_pass(u64 blocks, u64 pass)
{
    for (u32 d = 0; d < ndisks; d++)
        diskstamp_disk(d, blocks, pass);
}

static void diskstamp(u64 blocks, u64 dpasses)
{
    for (u64 pass = 1; dpasses == 0 || pass <= dpasses; pass++)
        diskstamp_pass(blocks, pass);
}

/* diskbench: 4 KiB requests, one at a time, over `blocks` blocks in
 * mode seqread, seqwrite, randread or randwrite; reports throughput. */
static void diskbench(u64 blocks, u64 count)
{
    int write = arg_is("mode", "seqwrite") || arg_is("mode", "randwrite");
    int rnd = arg_is("mode", "randread") || arg_is("mode", "randwrite");
    u64 x = seed | 1;
    for (u64 i = 0; i < DISK_BLOCK / 8; i++)
        ((u64 *)blk_buf)[i] = mix64(seed + i);
    u64 t0 = now_ns();
    for (u64 n = 0; n < count; n++) {
        u64 b;
        if (rnd) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            b = (x >> 17) % blocks;
        } else {
            b = n % blocks;
        }
        disk_request(0, write ? 1 : 0, b);
    }
    u64 dt = now_ns() - t0;
    lock_print();
    puts_("TESTGUEST BENCH workload=diskbench mode=");
    put_arg("mode");
    puts_(" requests=");
    put_dec(count);
    puts_(" bytes=");
    put_dec(count * DISK_BLOCK);
    puts_(" ns=");
    put_dec(dt);
    puts_("\n");
    unlock_print();
}

/* ---------------------------------------------------------------- */
/* virtio-net driver (polling, ring 3) and a tiny IPv4 responder      */
/* ---------------------------------------------------------------- */

/* Queues: 0 receive, 1 transmit, 2 control. Every frame has a 12-byte
 * virtio_net_hdr_v1 in front. All of it (rings, buffers, queue positions,
 * ARP cache, timers) is static guest memory, so a snapshot captures the
 * driver at the same instant as the device's side of the queues. */
#define NET_RXQ 16
#define NET_TXQ 16
#define NET_CTQ 4
#define NET_QMAX 16
#define NET_HDR 12
#define NET_FRAME 1526 /* 1514 + VLAN tag + slack */
#define NET_BUF (NET_HDR + NET_FRAME)
#define NET_ARP_ENTRIES 8
#define NET_STATUS_EVERY 10000000ull /* read the config status every 10 ms */
#define NET_PING_EVERY 200000000ull  /* peer= echo requests every 200 ms */
#define NET_PING_UNANSWERED 5        /* then the peer is ARP-resolved again */

#define F_NET_MAC 5
#define F_NET_STATUS 16
#define F_NET_CTRL_VQ 17
#define F_NET_GUEST_ANNOUNCE 21
#define F_VERSION_1 32
#define NET_S_ANNOUNCE 2
#define NET_CTRL_ANNOUNCE 3
#define NET_CTRL_ANNOUNCE_ACK 0

struct netq {
    struct vq_desc desc[NET_QMAX] __attribute__((aligned(4096)));
    struct {
        u16 flags;
        u16 idx;
        u16 ring[NET_QMAX];
        u16 used_event;
    } avail __attribute__((aligned(4096)));
    struct {
        u16 flags;
        u16 idx;
        struct {
            u32 id;
            u32 len;
        } ring[NET_QMAX];
        u16 avail_event;
    } used __attribute__((aligned(4096)));
    u16 size;
    u16 last_used;
};

struct arp_entry {
    u32 ip;
    u8 mac[6];
    u8 valid;
};

static struct vnet {
    struct netq q[3];
    u8 rx[NET_RXQ][NET_BUF] __attribute__((aligned(64)));
    u8 tx[NET_TXQ][NET_BUF] __attribute__((aligned(64)));
    u8 tx_busy[NET_TXQ];
    u8 ctrl_cmd[2] __attribute__((aligned(64)));
    volatile u8 ctrl_ack;
    volatile u32 *vio;
    u64 base;
    u32 irq;
    u64 features;
    u8 mac[6];
    u32 ip, mask, peer;
    struct arp_entry arp[NET_ARP_ENTRIES];
    u32 arp_next;
    u16 ip_id;
    u16 ping_id, ping_seq;
    u32 ping_unanswered;
    u64 next_tick, next_status, next_ping, announce_backoff;
    u32 announces;
} net;

static u32 nreg_read(u32 off)
{
    return net.vio[off / 4];
}

static void nreg_write(u32 off, u32 v)
{
    net.vio[off / 4] = v;
}

static void net_fail(const char *what, u64 a)
{
    lock_print();
    puts_("TESTGUEST FAIL net ");
    puts_(what);
    puts_(" ");
    put_hex(a);
    puts_("\n");
    unlock_print();
    __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
    guest_exit(STATUS_VERIFY_FAILED);
    sys_halt();
}

static inline u16 get16(const u8 *p)
{
    return (u16)((p[0] << 8) | p[1]);
}

static inline u32 get32(const u8 *p)
{
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

static inline void put16(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 8);
    p[1] = (u8)v;
}

static inline void put32(u8 *p, u32 v)
{
    p[0] = (u8)(v >> 24);
    p[1] = (u8)(v >> 16);
    p[2] = (u8)(v >> 8);
    p[3] = (u8)v;
}

static void put_ip(u32 ip)
{
    for (int s = 24; s >= 0; s -= 8) {
        put_dec((ip >> s) & 0xff);
        if (s)
            putc_('.');
    }
}

static void put_mac(const u8 *m)
{
    for (int i = 0; i < 6; i++) {
        putc_("0123456789abcdef"[m[i] >> 4]);
        putc_("0123456789abcdef"[m[i] & 15]);
        if (i < 5)
            putc_(':');
    }
}

/* Parses "A.B.C.D" (and "/N" if `prefix` is given; default /24) up to a
 * space or the end. Returns 0 on junk. */
static int parse_ip(const char *v, u32 *ip, u32 *prefix)
{
    u32 r = 0;
    for (int part = 0; part < 4; part++) {
        u32 x = 0, digits = 0;
        while (*v >= '0' && *v <= '9' && digits < 4) {
            x = x * 10 + (u32)(*v++ - '0');
            digits++;
        }
        if (!digits || x > 255)
            return 0;
        r = r << 8 | x;
        if (part < 3 && *v++ != '.')
            return 0;
    }
    if (prefix) {
        *prefix = 24;
        if (*v == '/') {
            u32 n = 0, digits = 0;
            for (v++; *v >= '0' && *v <= '9' && digits < 3; v++, digits++)
                n = n * 10 + (u32)(*v - '0');
            if (!digits || n > 32)
                return 0;
            *prefix = n;
        }
    }
    if (*v && *v != ' ')
        return 0;
    *ip = r;
    return 1;
}

/* Internet checksum. */
static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
    while (len > 1) {
        sum += (u32)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (u32)p[0] << 8;
    return sum;
}

static u16 csum_fold(u32 sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static int mac_is(const u8 *m, const u8 *n)
{
    for (int i = 0; i < 6; i++)
        if (m[i] != n[i])
            return 0;
    return 1;
}

static const u8 mac_bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static const u8 mac_zero[6];

/* ---- queues ---- */

static void net_notify(u32 q)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(*(volatile u16 *)&net.q[q].used.flags & 1)) /* VRING_USED_F_NO_NOTIFY */
        nreg_write(0x50, q);
}

static void net_post(u32 q, u16 head)
{
    struct netq *v = &net.q[q];
    u16 idx = v->avail.idx;
    v->avail.ring[idx % v->size] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *(volatile u16 *)&v->avail.idx = (u16)(idx + 1);
}

/* Marks transmitted buffers free again. */
static void net_tx_reclaim(void)
{
    struct netq *v = &net.q[1];
    u16 used = *(volatile u16 *)&v->used.idx;
    while (v->last_used != used) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        u32 id = v->used.ring[v->last_used % v->size].id;
        if (id < NET_TXQ)
            net.tx_busy[id] = 0;
        v->last_used++;
    }
}

/* A free transmit buffer (its frame area starts at net.tx[slot] + NET_HDR),
 * or -1 if the device kept all of them for 2 ms (the frame is dropped). */
static int net_tx_get(void)
{
    u64 t0 = 0;
    for (;;) {
        net_tx_reclaim();
        for (int i = 0; i < NET_TXQ; i++)
            if (!net.tx_busy[i])
                return i;
        if (!t0)
            t0 = now_ns();
        else if (now_ns() - t0 > 2000000ull)
            return -1;
        cpu_relax();
    }
}

/* Sends the frame of `len` bytes in buffer `slot` (header zeroed, short
 * frames padded to the Ethernet minimum of 60 bytes). */
static void net_tx_put(int slot, u32 len)
{
    u8 *b = net.tx[slot];
    for (u32 i = 0; i < NET_HDR; i++)
        b[i] = 0;
    for (; len < 60; len++)
        b[NET_HDR + len] = 0;
    net.tx_busy[slot] = 1;
    net.q[1].desc[slot] = (struct vq_desc){(u64)b, NET_HDR + len, 0, 0};
    net_post(1, (u16)slot);
    net_notify(1);
}

/* ---- ARP ---- */

static struct arp_entry *arp_lookup(u32 ip)
{
    for (int i = 0; i < NET_ARP_ENTRIES; i++)
        if (net.arp[i].valid && net.arp[i].ip == ip)
            return &net.arp[i];
    return 0;
}

static void arp_learn(u32 ip, const u8 *mac)
{
    if (!ip || ip == net.ip || ((ip ^ net.ip) & net.mask) || (mac[0] & 1))
        return;
    struct arp_entry *e = arp_lookup(ip);
    if (!e) {
        e = &net.arp[net.arp_next];
        net.arp_next = (net.arp_next + 1) % NET_ARP_ENTRIES;
    }
    e->ip = ip;
    for (int i = 0; i < 6; i++)
        e->mac[i] = mac[i];
    e->valid = 1;
}

/* Ethernet header into buffer `slot`; returns the payload area. */
static u8 *net_eth(int slot, const u8 *dst, u16 type)
{
    u8 *f = net.tx[slot] + NET_HDR;
    for (int i = 0; i < 6; i++) {
        f[i] = dst[i];
        f[6 + i] = net.mac[i];
    }
    put16(f + 12, type);
    return f + 14;
}

static void arp_send(u16 op, const u8 *eth_dst, const u8 *tha, u32 tpa)
{
    int slot = net_tx_get();
    if (slot < 0)
        return;
    u8 *a = net_eth(slot, eth_dst, 0x0806);
    put16(a, 1);      /* Ethernet */
    put16(a + 2, 0x0800);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    for (int i = 0; i < 6; i++) {
        a[8 + i] = net.mac[i];
        a[18 + i] = tha[i];
    }
    put32(a + 14, net.ip);
    put32(a + 24, tpa);
    net_tx_put(slot, 14 + 28);
}

static void net_arp(const u8 *f, u32 len)
{
    const u8 *a = f + 14;
    if (len < 14 + 28 || get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
        return;
    u16 op = get16(a + 6);
    u32 spa = get32(a + 14), tpa = get32(a + 24);
    if (op != 1 && op != 2)
        return;
    arp_learn(spa, a + 8);
    if (op == 1 && tpa == net.ip && spa != net.ip)
        arp_send(2, f + 6, a + 8, spa);
}

/* ---- IPv4, ICMP echo, UDP echo (port 7) ---- */

/* Sends an IPv4 datagram whose `plen`-byte payload the caller wrote at
 * net_eth(slot, ...) + 20. */
static void ip_send(int slot, u32 dst, u8 proto, u32 plen)
{
    u8 *ip = net.tx[slot] + NET_HDR + 14;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, 20 + plen);
    put16(ip + 4, net.ip_id++);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = proto;
    put16(ip + 10, 0);
    put32(ip + 12, net.ip);
    put32(ip + 16, dst);
    put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
    net_tx_put(slot, 14 + 20 + plen);
}

static void net_ping_reply_seen(u32 src, u16 seq)
{
    net.ping_unanswered = 0;
    lock_print();
    puts_("TESTGUEST NET ping peer=");
    put_ip(src);
    puts_(" seq=");
    put_dec(seq);
    puts_(" ok\n");
    unlock_print();
}

static void net_ip(const u8 *f, u32 len)
{
    const u8 *ip = f + 14;
    u32 iplen = len - 14;
    if (iplen < 20 || (ip[0] >> 4) != 4)
        return;
    u32 ihl = (ip[0] & 15) * 4u, tot = get16(ip + 2);
    if (ihl < 20 || tot < ihl || tot > iplen || csum_fold(csum_add(0, ip, ihl)) != 0)
        return;
    if (get16(ip + 6) & 0x3fff) /* a fragment */
        return;
    u32 src = get32(ip + 12), dst = get32(ip + 16);
    if (dst != net.ip)
        return;
    const u8 *p = ip + ihl;
    u32 plen = tot - ihl;
    if (ip[9] == 1 && plen >= 8 && csum_fold(csum_add(0, p, plen)) == 0) {
        if (p[0] == 8 && p[1] == 0) { /* echo request: reply in kind */
            int slot = net_tx_get();
            if (slot < 0)
                return;
            u8 *r = net_eth(slot, f + 6, 0x0800) + 20;
            for (u32 i = 0; i < plen; i++)
                r[i] = p[i];
            r[0] = 0; /* echo reply */
            put16(r + 2, 0);
            put16(r + 2, csum_fold(csum_add(0, r, plen)));
            ip_send(slot, src, 1, plen);
        } else if (p[0] == 0 && p[1] == 0 && net.peer && src == net.peer &&
                   get16(p + 4) == net.ping_id) {
            net_ping_reply_seen(src, get16(p + 6));
        }
    } else if (ip[9] == 17 && plen >= 8) {
        u32 ulen = get16(p + 4);
        if (ulen < 8 || ulen > plen || get16(p + 2) != 7)
            return;
        if (get16(p + 6)) { /* a checksum to verify */
            u8 ph[12];
            put32(ph, src);
            put32(ph + 4, dst);
            ph[8] = 0;
            ph[9] = 17;
            put16(ph + 10, ulen);
            if (csum_fold(csum_add(csum_add(0, ph, 12), p, ulen)) != 0)
                return;
        }
        int slot = net_tx_get();
        if (slot < 0)
            return;
        u8 *u = net_eth(slot, f + 6, 0x0800) + 20;
        for (u32 i = 0; i < ulen; i++)
            u[i] = p[i];
        put16(u, get16(p + 2)); /* source port 7 */
        put16(u + 2, get16(p));  /* back to the sender's port */
        put16(u + 6, 0);
        u8 ph[12];
        put32(ph, net.ip);
        put32(ph + 4, src);
        ph[8] = 0;
        ph[9] = 17;
        put16(ph + 10, ulen);
        u16 c = csum_fold(csum_add(csum_add(0, ph, 12), u, ulen));
        put16(u + 6, c ? c : 0xffff);
        ip_send(slot, src, 17, ulen);
    }
}

static void net_frame(const u8 *f, u32 len)
{
    if (len < 14 || !(mac_is(f, net.mac) || mac_is(f, mac_bcast)))
        return;
    u16 type = get16(f + 12);
    if (type == 0x0806)
        net_arp(f, len);
    else if (type == 0x0800)
        net_ip(f, len);
}

/* Handles every received frame and gives its buffer back. */
static void net_rx(void)
{
    struct netq *v = &net.q[0];
    u16 used = *(volatile u16 *)&v->used.idx;
    if (v->last_used == used)
        return;
    while (v->last_used != used) {
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        u32 id = v->used.ring[v->last_used % v->size].id;
        u32 len = v->used.ring[v->last_used % v->size].len;
        v->last_used++;
        if (id >= NET_RXQ)
            continue; /* not ours: nothing to give back */
        if (len > NET_HDR && len <= NET_BUF)
            net_frame(net.rx[id] + NET_HDR, len - NET_HDR);
        net_post(0, (u16)id);
    }
    net_notify(0);
}

/* ---- peer pings, announce ---- */

static void net_ping_tick(void)
{
    struct arp_entry *e = arp_lookup(net.peer);
    if (e && net.ping_unanswered >= NET_PING_UNANSWERED) {
        e->valid = 0; /* unanswered: resolve it again */
        e = 0;
        net.ping_unanswered = 0;
    }
    if (!e) {
        arp_send(1, mac_bcast, mac_zero, net.peer);
        return;
    }
    int slot = net_tx_get();
    if (slot < 0)
        return;
    u8 *p = net_eth(slot, e->mac, 0x0800) + 20;
    net.ping_seq++;
    p[0] = 8;
    p[1] = 0;
    put16(p + 2, 0);
    put16(p + 4, net.ping_id);
    put16(p + 6, net.ping_seq);
    u64 t = now_ns();
    for (u32 i = 0; i < 56; i++)
        p[8 + i] = i < 8 ? (u8)(t >> (8 * i)) : (u8)i;
    put16(p + 2, csum_fold(csum_add(0, p, 64)));
    ip_send(slot, net.peer, 1, 64);
    net.ping_unanswered++;
}

/* Gratuitous ARP: a request and a reply for our own address, both
 * broadcast, from (and naming) net.mac. */
static void net_garp(void)
{
    arp_send(1, mac_bcast, mac_zero, net.ip);
    arp_send(2, mac_bcast, net.mac, net.ip);
}

/* VIRTIO_NET_S_ANNOUNCE: gratuitous ARP, then VIRTIO_NET_CTRL_ANNOUNCE_ACK
 * on the control queue, which clears the bit. */
static void net_announce(void)
{
    net_garp();
    struct netq *v = &net.q[2];
    net.ctrl_cmd[0] = NET_CTRL_ANNOUNCE;
    net.ctrl_cmd[1] = NET_CTRL_ANNOUNCE_ACK;
    net.ctrl_ack = 0xff;
    v->desc[0] = (struct vq_desc){(u64)net.ctrl_cmd, 2, 1, 1};
    v->desc[1] = (struct vq_desc){(u64)&net.ctrl_ack, 1, 2, 0};
    net_post(2, 0);
    nreg_write(0x50, 2);
    u64 t0 = now_ns();
    int acked = 1;
    while (*(volatile u16 *)&v->used.idx == v->last_used) {
        if (now_ns() - t0 > 1000000000ull) {
            acked = 0;
            break;
        }
        cpu_relax();
    }
    if (acked)
        v->last_used++;
    net.announces++;
    lock_print();
    puts_("TESTGUEST NET announce n=");
    put_dec(net.announces);
    if (acked) {
        puts_(" ack=");
        put_dec(net.ctrl_ack);
    } else {
        puts_(" ack=timeout");
    }
    puts_("\n");
    unlock_print();
    /* Should the bit stay set (no ack), announce again in 1 s, not 10 ms. */
    net.announce_backoff = now_ns() + 1000000000ull;
    if (!acked)
        net.features &= ~(1ull << F_NET_GUEST_ANNOUNCE); /* the queue is stuck */
}

static void vmgen_check(u64 t);

/* The timed work, every millisecond or so. */
static void net_tick(u64 t)
{
    net_tx_reclaim();
    if ((net.features & (1ull << F_NET_STATUS)) &&
        timer_due(&net.next_status, t, NET_STATUS_EVERY)) {
        u32 isr = nreg_read(0x60);
        if (isr)
            nreg_write(0x64, isr); /* nothing takes interrupts: just ack */
        u16 st = *(volatile u16 *)((volatile u8 *)net.vio + 0x100 + 6);
        if ((st & NET_S_ANNOUNCE) && (net.features & (1ull << F_NET_GUEST_ANNOUNCE)) &&
            (int64_t)(t - net.announce_backoff) >= 0) {
            /* A VMM that announces a clone may be quicker (10 ms) than the
             * generation poll (100 ms): take up a new MAC first, so the
             * announcement never names the old one. */
            if (vmgen_on)
                vmgen_check(t);
            net_announce();
        }
    }
    if (net.peer && timer_due(&net.next_ping, t, NET_PING_EVERY))
        net_ping_tick();
}

/* One network poll at time `t`: received frames, then the timed work. */
static void net_poll(u64 t)
{
    if (*(volatile u16 *)&net.q[0].used.idx != net.q[0].last_used)
        net_rx();
    if (timer_due(&net.next_tick, t, 1000000ull))
        net_tick(t);
}

/* The MAC in the device config (offset 0), read again should the config
 * generation (register 0xfc) change meanwhile. */
static void net_read_mac(u8 *m)
{
    for (int tries = 0; tries < 4; tries++) {
        u32 g = nreg_read(0xfc);
        for (int i = 0; i < 6; i++)
            m[i] = ((volatile u8 *)net.vio)[0x100 + i];
        if (nreg_read(0xfc) == g)
            return;
    }
}

/* After a generation change: a clone's device has a MAC of its own while
 * its memory still holds the old one. Read it again and, if it differs,
 * send everything from it from now on (and accept frames to it), announce
 * it by gratuitous ARP and print the NET mac= line. */
static void net_generation_changed(void)
{
    if (!(net.features & (1ull << F_NET_MAC)))
        return; /* our MAC comes from our address, not from the device */
    u8 m[6], old[6];
    net_read_mac(m);
    if (mac_is(m, net.mac))
        return;
    for (int i = 0; i < 6; i++) {
        old[i] = net.mac[i];
        net.mac[i] = m[i];
    }
    net_garp();
    lock_print();
    puts_("TESTGUEST NET mac=");
    put_mac(net.mac);
    puts_(" old=");
    put_mac(old);
    puts_("\n");
    unlock_print();
}

/* ---- set-up ---- */

static void net_queue(u32 q, u16 size)
{
    struct netq *v = &net.q[q];
    nreg_write(0x30, q);
    if (nreg_read(0x44))
        net_fail("queue already live", q);
    if (nreg_read(0x34) < size)
        net_fail("queue too small", q);
    v->size = size;
    v->avail.flags = 1; /* VRING_AVAIL_F_NO_INTERRUPT: the driver polls */
    nreg_write(0x38, size);
    nreg_write(0x80, (u32)(u64)&v->desc);
    nreg_write(0x84, (u32)((u64)&v->desc >> 32));
    nreg_write(0x90, (u32)(u64)&v->avail);
    nreg_write(0x94, (u32)((u64)&v->avail >> 32));
    nreg_write(0xa0, (u32)(u64)&v->used);
    nreg_write(0xa4, (u32)((u64)&v->used >> 32));
    nreg_write(0x44, 1);
    v->last_used = v->used.idx;
}

/* Brings the first virtio-net device (found before READY) up: features,
 * queues, receive buffers; then prints the NET up line. vCPU 0 only. */
static void net_start(void)
{
    net.vio = (volatile u32 *)net.base;
    if (nreg_read(0) != 0x74726976 || nreg_read(4) != 2 || nreg_read(8) != VIRTIO_ID_NET)
        net_fail("no virtio 1.x network device at", net.base);
    nreg_write(0x70, 0);
    nreg_write(0x70, 1);     /* ACKNOWLEDGE */
    nreg_write(0x70, 1 | 2); /* DRIVER */
    nreg_write(0x14, 0);
    u64 offered = nreg_read(0x10);
    nreg_write(0x14, 1);
    offered |= (u64)nreg_read(0x10) << 32;
    if (!(offered & (1ull << F_VERSION_1)))
        net_fail("device does not offer VIRTIO_F_VERSION_1", offered);
    u64 want = (1ull << F_VERSION_1) | (1ull << F_NET_MAC) | (1ull << F_NET_STATUS) |
               (1ull << F_NET_CTRL_VQ);
    if (offered & (1ull << F_NET_CTRL_VQ))
        want |= 1ull << F_NET_GUEST_ANNOUNCE; /* it needs the control queue */
    net.features = offered & want;
    nreg_write(0x24, 0);
    nreg_write(0x20, (u32)net.features);
    nreg_write(0x24, 1);
    nreg_write(0x20, (u32)(net.features >> 32));
    nreg_write(0x70, 1 | 2 | 8); /* FEATURES_OK */
    if (!(nreg_read(0x70) & 8))
        net_fail("device refused our features", net.features);
    net_queue(0, NET_RXQ);
    net_queue(1, NET_TXQ);
    if (net.features & (1ull << F_NET_CTRL_VQ))
        net_queue(2, NET_CTQ);
    if (net.features & (1ull << F_NET_MAC)) {
        net_read_mac(net.mac);
    } else {
        /* No MAC offered: a locally administered one from our address. */
        net.mac[0] = 0x02;
        net.mac[1] = 0x00;
        put32(net.mac + 2, net.ip);
    }
    for (u16 i = 0; i < NET_RXQ; i++) {
        net.q[0].desc[i] = (struct vq_desc){(u64)net.rx[i], NET_BUF, 2, 0};
        net_post(0, i);
    }
    nreg_write(0x70, 1 | 2 | 8 | 4); /* DRIVER_OK */
    nreg_write(0x50, 0);
    net.ping_id = (u16)(0x7400 | (net.ip & 0xff));
    u64 t = now_ns();
    net.next_tick = t;
    net.next_status = t;
    net.next_ping = t;
    net.announce_backoff = t;
    net_on = 1;
    lock_print();
    puts_("TESTGUEST NET up ip=");
    put_ip(net.ip);
    puts_(" mac=");
    put_mac(net.mac);
    puts_("\n");
    unlock_print();
}

/* ---------------------------------------------------------------- */
/* VM generation (snapvm's device at I/O ports 0x540-0x54f)          */
/* ---------------------------------------------------------------- */

/* A 128-bit value, four 32-bit words at 0x540, 0x544, 0x548 and 0x54c
 * (word 0 least significant), that changes whenever the VM's memory goes
 * on in another context: a snapshot applied, a VM cloned (the role of
 * ACPI's VM Generation ID). All ones in every word (nothing at the ports)
 * is no device (QEMU), and so would be QEMU's fw_cfg if the port were
 * 0x510: its DMA address register at 0x514 reads as the signature
 * "QEMU CFG". Without a device the ports are read at boot only. */
#define VMGEN_PORT 0x540
#define VMGEN_POLL_EVERY 100000000ull /* read it at most every 100 ms */

static struct {
    u32 cur[4];   /* the generation the guest runs in */
    u64 next;     /* now_ns() of the next read */
} vmgen;

static void vmgen_read(u32 *w)
{
    for (int i = 0; i < 4; i++)
        w[i] = inl((u16)(VMGEN_PORT + 4 * i));
}

static int vmgen_same(const u32 *a, const u32 *b)
{
    return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* Reads the value again until two reads in a row agree (a snapshot taken
 * between two of the four port reads would tear one). `w` holds a first
 * read on entry and the settled value on return. */
static void vmgen_settle(u32 *w)
{
    for (int tries = 0; tries < 8; tries++) {
        u32 again[4];
        vmgen_read(again);
        if (vmgen_same(again, w))
            return;
        for (int i = 0; i < 4; i++)
            w[i] = again[i];
    }
}

static void put_vmgen(const u32 *w)
{
    for (int i = 3; i >= 0; i--)
        for (int s = 28; s >= 0; s -= 4)
            putc_("0123456789abcdef"[(w[i] >> s) & 15]);
}

/* At boot (before READY): 1 if a generation device answers, its value in
 * vmgen.cur. Without one, these four reads are the only ones of its ports. */
static int vmgen_probe(void)
{
    vmgen_read(vmgen.cur);
    if ((vmgen.cur[0] & vmgen.cur[1] & vmgen.cur[2] & vmgen.cur[3]) == 0xffffffffu)
        return 0; /* nothing there */
    if (vmgen.cur[1] == 0x554d4551 && vmgen.cur[2] == 0x47464320)
        return 0; /* "QEMU CFG": QEMU's fw_cfg */
    vmgen_settle(vmgen.cur);
    return 1;
}

/* Reads the generation (vCPU 0, vmgen_on) and handles a change: the
 * GENERATION line, then a new MAC if the network is up. */
static void vmgen_check(u64 t)
{
    vmgen.next = t + VMGEN_POLL_EVERY;
    u32 w[4];
    vmgen_read(w);
    if (vmgen_same(w, vmgen.cur))
        return;
    vmgen_settle(w);
    if (vmgen_same(w, vmgen.cur))
        return;
    lock_print();
    puts_("TESTGUEST GENERATION old=");
    put_vmgen(vmgen.cur);
    puts_(" new=");
    put_vmgen(w);
    puts_("\n");
    unlock_print();
    for (int i = 0; i < 4; i++)
        vmgen.cur[i] = w[i];
    if (net_on)
        net_generation_changed();
}

/* ---------------------------------------------------------------- */
/* keep_mib=N: a read-mostly region (like kernel text, page cache)    */
/* ---------------------------------------------------------------- */

/* N MiB of RAM above the memstamp area (above the image without
 * memstamp), filled by vCPU 0 at boot before READY and never written
 * again: pages a VM cloned from a snapshot can keep sharing. vCPU 0 reads
 * and checks every word of it at most every 10 s, from its polls. Page p
 * (0-based within the region) holds the words of keep_stamp_base(p): the
 * memstamp word pattern from the page index and the seed, in a page-index
 * space of its own (bit 62; diskstamp uses bit 63), so no memstamp or disk
 * stamp is ever a valid keep page. */
#define KEEP_CHECK_EVERY 10000000000ull /* a check at most every 10 s */
#define KEEP_NET_EVERY 256              /* pages between network polls in a check */

static struct {
    struct range area[MAX_RANGES];
    u32 ranges;
    u64 pages;
    u64 mib;
    u64 checks; /* verifications passed */
    u64 next;   /* now_ns() of the next check */
} keep;

static inline u64 keep_stamp_base(u64 page)
{
    return stamp_base(page ^ 0x4000000000000000ull, 0);
}

static volatile u64 *keep_page_addr(u64 page)
{
    return ranges_page_addr(keep.area, keep.ranges, page);
}

/* At boot, vCPU 0, before READY: writes the whole region, once. */
static void keep_fill(void)
{
    for (u64 page = 0; page < keep.pages; page++) {
        volatile u64 *p = keep_page_addr(page);
        u64 base = keep_stamp_base(page);
        for (u64 i = 0; i < PAGE_SIZE / 8; i++)
            p[i] = stamp_word(base, i);
    }
}

/* Reads every word of the region (never writing it) and prints the PASS
 * line, or the FAIL line at the first wrong word and stops. With the
 * network up it is served every KEEP_NET_EVERY pages meanwhile. */
static void keep_check(void)
{
    for (u64 page = 0; page < keep.pages; page++) {
        const volatile u64 *p = keep_page_addr(page);
        u64 base = keep_stamp_base(page);
        for (u64 i = 0; i < PAGE_SIZE / 8; i++) {
            u64 expect = stamp_word(base, i);
            u64 found = p[i];
            if (found != expect) {
                lock_print();
                puts_("TESTGUEST FAIL vcpu=0 workload=keep page=");
                put_dec(page);
                puts_(" addr=");
                put_hex((u64)p + i * 8);
                puts_(" word=");
                put_dec(i);
                puts_(" expected=");
                put_hex(expect);
                puts_(" found=");
                put_hex(found);
                puts_(" checks=");
                put_dec(keep.checks);
                puts_("\n");
                unlock_print();
                __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
                guest_exit(STATUS_VERIFY_FAILED);
                sys_halt();
            }
        }
        if (net_on && (page % KEEP_NET_EVERY) == KEEP_NET_EVERY - 1)
            net_poll(now_ns());
    }
    keep.checks++;
    lock_print();
    puts_("TESTGUEST PASS vcpu=0 workload=keep mib=");
    put_dec(keep.mib);
    puts_(" checks=");
    put_dec(keep.checks);
    puts_("\n");
    unlock_print();
}

/* vCPU 0's poll with a network, a generation device or a keep region: the
 * network's poll, every 100 ms the generation and every 10 s the keep
 * region (otherwise only a clock read and a comparison for each). */
static void vcpu0_poll_slow(void)
{
    static int in_poll;
    if (in_poll)
        return;
    in_poll = 1;
    u64 t = now_ns();
    if (net_on)
        net_poll(t);
    if (vmgen_on && timer_due(&vmgen.next, t, VMGEN_POLL_EVERY))
        vmgen_check(t);
    if (keep_on && timer_due(&keep.next, t, KEEP_CHECK_EVERY)) {
        keep_check();
        keep.next = now_ns() + KEEP_CHECK_EVERY; /* 10 s from its end */
    }
    in_poll = 0;
}

/* Serves the network and watches the generation for good (vCPU 0 with
 * nothing else to do). */
static void vcpu0_serve_forever(void)
{
    for (;;) {
        vcpu0_poll();
        cpu_relax();
    }
}

#include "hostile.c"

/* ---------------------------------------------------------------- */
/* Entry points                                                      */
/* ---------------------------------------------------------------- */

static void finish_cpu(void)
{
    u32 done = __atomic_add_fetch(&cpus_done, 1, __ATOMIC_SEQ_CST);
    if (done == ncpus && !failed) {
        lock_print();
        puts_("TESTGUEST DONE status=0\n");
        unlock_print();
        guest_exit(STATUS_OK);
    }
    /* vCPU 0 keeps answering the network instead of halting. The
     * generation alone does not keep it awake: an idle VM must not burn a
     * host CPU (it is watched while a workload runs). */
    if (net_on && this_cpu() == 0)
        vcpu0_serve_forever();
    sys_halt();
}

static void fail_args(const char *what)
{
    lock_print();
    puts_("TESTGUEST FAIL bad-arguments ");
    puts_(what);
    puts_(" cmdline=\"");
    puts_(cmdline);
    puts_("\"\n");
    unlock_print();
    guest_exit(STATUS_BAD_ARGS);
    sys_halt();
}

static void run_workload(u32 cpu)
{
    if (cpu >= ncpus)
        sys_halt(); /* a vCPU beyond vcpus= takes no part */
    if (arg_is("workload", "diskstamp")) {
        if (cpu == 0)
            diskstamp(disk_blocks, passes);
        finish_cpu();
    } else if (arg_is("workload", "memstamp") && with_disk && ncpus == 1) {
        /* One vCPU does both: a diskstamp pass over every driven disk,
         * then a memstamp pass over the whole area, and so on. */
        for (u64 gen = 1; passes == 0 || gen <= passes; gen++) {
            diskstamp_pass(disk_blocks, gen);
            memstamp_pass(0, 0, area_pages, gen);
        }
        finish_cpu();
    } else if (arg_is("workload", "memstamp") && with_disk) {
        /* vCPU 0 stamps the disks, the others stamp memory. */
        if (cpu == 0)
            diskstamp(disk_blocks, passes);
        else
            memstamp(cpu, cpu - 1, ncpus - 1);
        finish_cpu();
    } else if (arg_is("workload", "diskbench")) {
        if (cpu == 0) {
            int ok = 1;
            diskbench(disk_blocks, arg_u64("requests", 1024, &ok));
        }
        finish_cpu();
    } else if (arg_is("workload", "memstamp")) {
        memstamp(cpu, cpu, ncpus);
        finish_cpu();
    } else if (arg_is("workload", "emulation")) {
        if (cpu == 0) {
            /* int3 and fwait in ring 0 (the VMM recovers), then optionally
             * cmpxchg16b (the VMM must stop and report it). */
            sys_probe(arg_is("probe", "cmpxchg16b"));
            lock_print();
            puts_("TESTGUEST PASS vcpu=0 workload=emulation breakpoints=");
            put_dec(breakpoints_seen);
            puts_("\n");
            unlock_print();
            guest_exit(breakpoints_seen == 1 ? STATUS_OK : STATUS_VERIFY_FAILED);
        }
        sys_halt();
    } else if (arg_is("workload", "hostile")) {
        hostile(cpu); /* every vCPU attacks; ends in finish_cpu() */
    } else if (arg_is("workload", "crash")) {
        if (cpu == 0) {
            /* Beyond the 16 GiB identity map: a ring-3 page fault. */
            volatile u64 *bad = (volatile u64 *)0x00007fff00000000ull;
            *bad = 1;
        }
        sys_halt();
    } else {
        /* idle: vCPU 0 serves the network (and then watches the
         * generation too); otherwise it halts like the others */
        if (net_on && cpu == 0)
            vcpu0_serve_forever();
        sys_halt();
    }
}

static void ap_main(u32 cpu)
{
    __atomic_add_fetch(&cpus_online, 1, __ATOMIC_SEQ_CST);
    while (!go)
        cpu_relax();
    run_workload(cpu);
}

static void bsp_main(void)
{
    const struct hvm_start_info *si = (const void *)pvh_start_info;
    if (si->magic != 0x336ec578) {
        puts_("TESTGUEST FAIL no PVH start info\n");
        guest_exit(STATUS_BAD_ARGS);
        sys_halt();
    }
    if (si->cmdline_paddr)
        cmdline = (const char *)si->cmdline_paddr;
    if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries) {
        puts_("TESTGUEST FAIL no memory map in PVH start info\n");
        guest_exit(STATUS_BAD_ARGS);
        sys_halt();
    }
    ram_bytes = total_ram(si);

    int ok = 1;
    seed = arg_u64("seed", 1, &ok);
    passes = arg_u64("passes", 1, &ok);
    rate_mibps = arg_u64("rate", 0, &ok);
    u64 mem_mib = arg_u64("mem_mib", 16, &ok);
    keep.mib = arg_u64("keep_mib", 0, &ok);
    u64 want_cpus = arg_u64("vcpus", mp_count_cpus(), &ok);
    if (!ok)
        fail_args("(a number is malformed)");
    if (arg("workload") && !(arg_is("workload", "idle") || arg_is("workload", "memstamp") ||
                              arg_is("workload", "crash") || arg_is("workload", "emulation") ||
                              arg_is("workload", "diskstamp") || arg_is("workload", "diskbench") ||
                              arg_is("workload", "hostile")))
        fail_args("(workload must be idle, memstamp, diskstamp, diskbench, crash, emulation or "
                  "hostile)");
    if (arg_is("workload", "hostile")) {
        h.seconds = arg_u64("seconds", 5, &ok);
        h.min_buf = arg_u64("min_buf", 1, &ok);
        if (!ok || h.min_buf > 4096)
            fail_args("(seconds or min_buf (at most 4096) is malformed)");
        if (!h.min_buf)
            h.min_buf = 1;
        /* hostile drives every device itself, the network adapter too */
        if (arg("ip") || arg("peer"))
            fail_args("(workload=hostile attacks every device: no ip= or peer=)");
    }
    if (arg_is("workload", "diskbench") &&
        !(arg_is("mode", "seqread") || arg_is("mode", "seqwrite") || arg_is("mode", "randread") ||
          arg_is("mode", "randwrite")))
        fail_args("(diskbench mode must be seqread, seqwrite, randread or randwrite)");
    if (want_cpus == 0 || want_cpus > MAX_CPUS)
        fail_args("(vcpus out of range)");
    ncpus = (u32)want_cpus;

    if (arg_is("workload", "memstamp")) {
        u64 want = mem_mib << 8;
        area_pages = build_area(si, want);
        if (area_pages < want || want == 0) {
            lock_print();
            puts_("TESTGUEST FAIL bad-arguments mem_mib=");
            put_dec(mem_mib);
            puts_(" does not fit: ");
            put_dec(area_pages >> 8);
            puts_(" MiB of RAM usable above the guest image\n");
            unlock_print();
            guest_exit(STATUS_BAD_ARGS);
            sys_halt();
        }
        if (area_pages < ncpus)
            fail_args("(fewer pages than vCPUs)");
    }

    /* keep_mib=N: the keep region, right above the memstamp area (filled
     * after the vCPUs are up). */
    if (keep.mib) {
        u64 mib = keep.mib < (16ull << 10) ? keep.mib : 16ull << 10; /* no overflow */
        u64 want = mib << 8;
        keep.pages = build_ranges(si, area_pages, want, keep.area, &keep.ranges);
        if (keep.pages < want || keep.mib > mib) {
            lock_print();
            puts_("TESTGUEST FAIL bad-arguments keep_mib=");
            put_dec(keep.mib);
            puts_(" does not fit: ");
            put_dec(keep.pages >> 8);
            puts_(" MiB of RAM usable above the guest image and the memstamp area\n");
            unlock_print();
            guest_exit(STATUS_BAD_ARGS);
            sys_halt();
        }
    }

    with_disk = arg_is("workload", "memstamp") && arg_is("disk", "1");
    if (arg_is("workload", "diskstamp") || arg_is("workload", "diskbench") || with_disk) {
        disk_blocks = arg_u64("blocks", 64, &ok);
        if (!ok || disk_blocks == 0 || disk_blocks > MAX_DISK_BLOCKS)
            fail_args("(blocks must be 1..1048576)");
        /* diskbench drives the first disk only. */
        u64 want_disks = arg_is("workload", "diskbench") ? 1 : arg_u64("disks", 1, &ok);
        if (!ok || want_disks == 0 || want_disks > MAX_DISKS)
            fail_args("(disks must be 1..4)");
        if (disk_blocks * want_disks > MAX_DISK_BLOCKS)
            fail_args("(blocks times disks must be at most 1048576)");
        /* Disks are the entries whose DeviceID is 2 (network adapters may
         * be listed too). */
        u32 found = virtio_mmio_count(VIRTIO_ID_BLOCK, (u32)want_disks);
        /* (No device at all with one disk wanted: disk_init(0) says so.) */
        if (found < want_disks &&
            !(arg_count("virtio_mmio.device") == 0 && want_disks == 1)) {
            lock_print();
            puts_("TESTGUEST FAIL bad-arguments disks=");
            put_dec(want_disks);
            puts_(" but the command line names ");
            put_dec(found);
            puts_(" virtio_mmio.device= disks cmdline=\"");
            puts_(cmdline);
            puts_("\"\n");
            unlock_print();
            guest_exit(STATUS_BAD_ARGS);
            sys_halt();
        }
        ndisks = (u32)want_disks;
        /* Disks beyond ndisks are not touched at all. */
        for (u32 d = 0; d < ndisks; d++) {
            disk_init(d);
            if (disk_blocks * (DISK_BLOCK / 512) > disks[d].sectors) {
                lock_print();
                puts_("TESTGUEST FAIL bad-arguments blocks=");
                put_dec(disk_blocks);
                puts_(" do not fit the disk of ");
                put_dec(disks[d].sectors);
                puts_(" sectors disk=");
                put_dec(d);
                puts_("\n");
                unlock_print();
                guest_exit(STATUS_BAD_ARGS);
                sys_halt();
            }
            if (arg_is("adopt", "1"))
                disk_adopt(d, disk_blocks);
        }
    }

    /* ip=A.B.C.D/N: the network (the first virtio-net device, DeviceID 1,
     * brought up by vCPU 0 after READY). Without ip= nothing of it is
     * touched. */
    int with_net = arg("ip") != 0;
    if (with_net) {
        u32 prefix;
        if (!parse_ip(arg("ip"), &net.ip, &prefix) || !net.ip)
            fail_args("(ip must be A.B.C.D or A.B.C.D/N)");
        net.mask = prefix ? ~0u << (32 - prefix) : 0;
        if (arg("peer") && (!parse_ip(arg("peer"), &net.peer, 0) || !net.peer ||
                            net.peer == net.ip))
            fail_args("(peer must be an address A.B.C.D other than ip=)");
        if (net.peer && ((net.peer ^ net.ip) & net.mask))
            fail_args("(peer must be in ip='s subnet: there is no router)");
        if (!virtio_mmio_find(VIRTIO_ID_NET, 0, &net.base, &net.irq))
            fail_args("(ip= but no virtio_mmio.device= entry is a network device)");
    } else if (arg("peer")) {
        fail_args("(peer= needs ip=)");
    }

    /* Wait for the APs (woken by INIT/SIPI in ring 0) for up to 5 s. */
    u64 t0 = now_ns();
    while (cpus_online + 1 < ncpus) {
        if (now_ns() - t0 > 5000000000ull) {
            lock_print();
            puts_("TESTGUEST FAIL only ");
            put_dec(cpus_online + 1);
            puts_(" of ");
            put_dec(ncpus);
            puts_(" vCPUs started\n");
            unlock_print();
            guest_exit(STATUS_NO_CPUS);
            sys_halt();
        }
        cpu_relax();
    }

    /* The keep region, written this once. */
    keep_fill();

    /* hostile: the devices, the places outside RAM, the descriptor table. */
    if (arg_is("workload", "hostile"))
        hostile_prepare(si);

    /* The VM generation, read once (and never again without a device). */
    int with_vmgen = vmgen_probe();

    lock_print();
    puts_("TESTGUEST READY vcpus=");
    put_dec(ncpus);
    puts_(" ram_mib=");
    put_dec(ram_bytes >> 20);
    puts_(" workload=");
    put_arg("workload");
    if (arg_is("workload", "diskstamp") || with_disk) {
        puts_(" blocks=");
        put_dec(disk_blocks);
        puts_(" disk_sectors=");
        put_dec(disks[0].sectors);
        if (ndisks > 1) {
            puts_(" disks=");
            put_dec(ndisks);
            for (u32 d = 1; d < ndisks; d++) {
                puts_(" disk");
                put_dec(d);
                puts_("_sectors=");
                put_dec(disks[d].sectors);
            }
        }
        puts_(" passes=");
        put_dec(passes);
        puts_(" seed=");
        put_dec(seed);
    }
    if (arg_is("workload", "memstamp")) {
        puts_(" mem_mib=");
        put_dec(mem_mib);
        puts_(" passes=");
        put_dec(passes);
        puts_(" seed=");
        put_dec(seed);
        puts_(" rate=");
        put_dec(rate_mibps);
    }
    puts_(" kvmclock=");
    put_dec(kvmclock_ok);
    if (keep.mib) {
        puts_(" keep_mib=");
        put_dec(keep.mib);
    }
    puts_(" generation=");
    if (with_vmgen)
        put_vmgen(vmgen.cur);
    else
        puts_("none");
    puts_("\n");
    unlock_print();

    vmgen.next = now_ns() + VMGEN_POLL_EVERY;
    vmgen_on = with_vmgen; /* vCPU 0 polls it from now on */
    keep.next = now_ns() + KEEP_CHECK_EVERY;
    keep_on = keep.mib != 0; /* and checks the keep region every 10 s */
    __atomic_store_n(&go, 1, __ATOMIC_SEQ_CST);
    if (with_net)
        net_start();
    run_workload(0);
}

void guest_entry(u64 cpu, u64 is_bsp)
{
    if (is_bsp)
        bsp_main();
    else
        ap_main((u32)cpu);
    sys_halt();
}

/* Ring 0: called from isr_common with the trap frame. Returns nonzero to
 * resume the interrupted code. */
int exception_handler(struct trap_frame *f)
{
    if (f->vector == 6 && f->rip == (u64)sys_halt_ud)
        halt_forever();
    if (f->vector == 6 && f->rip == (u64)sys_probe_ud) {
        ring0_probe(f->rdi);
        f->rip += 2; /* past the ud2 */
        return 1;
    }
    if (f->vector == 3 && f->rip == (u64)probe_after_int3) {
        breakpoints_seen++;
        return 1;
    }
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    u32 apic_id = *(volatile u32 *)0xFEE00020ull >> 24;
    static const char *const names[32] = {
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS",
        "#NP", "#SS", "#GP", "#PF", "R15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    };
    lock_print_bounded();
    puts_("TESTGUEST FAIL vcpu=");
    put_dec(apic_id);
    puts_(" exception=");
    put_dec(f->vector);
    if (f->vector < 22) {
        puts_("(");
        puts_(names[f->vector]);
        puts_(")");
    }
    puts_(" rip=");
    put_hex(f->rip);
    puts_(" err=");
    put_hex(f->error);
    puts_(" cr2=");
    put_hex(cr2);
    puts_(" cpl=");
    put_dec(f->cs & 3);
    puts_(" rsp=");
    put_hex(f->rsp);
    puts_("\n");
    unlock_print();
    guest_exit(STATUS_EXCEPTION);
    halt_forever();
    return 0;
}
