/*
 * workload=hostile: a guest that misbehaves on purpose, for the VMM's
 * robustness tests (tests/hostile.rs). Included by main.c, which it
 * shares its helpers and state with; kept apart because it is a program
 * of its own.
 */
static void finish_cpu(void);

/* ---------------------------------------------------------------- */
/* hostile: a misbehaving guest, for robustness tests of the VMM      */
/* ---------------------------------------------------------------- */

/*
 * For `seconds` seconds every vCPU attacks the devices it can reach:
 * random writes and reads over the whole register window (0x000-0x1ff)
 * of every virtio-mmio device, devices set up properly and then handed
 * hostile descriptor chains and notification storms, and random port I/O
 * on COM1, the i8042 and the generation ports. Every choice comes from a
 * PRNG seeded with seed= and the vCPU index, so a run can be replayed.
 *
 * The guest keeps itself safe whatever the VMM does with what it is given:
 * everything a device may write is outside guest RAM or in memory only the
 * devices use:
 *  - h_desc: one descriptor table of 65536 + 4 * 256 entries. Attacking
 *    vCPU a's queues start at entry a * 256 (its 256 private entries), so
 *    every 16-bit head or next index lands inside the table. Entries from
 *    1024 on are written once at boot (and checked at the end); every entry
 *    is at every instant either a buffer inside h_sink, h_hdr or outside
 *    RAM, or an indirect descriptor (never with the write flag) pointing
 *    into h_desc itself, bounded so that any index stays inside.
 *  - h_sink (1 MiB): device-written junk: every used ring (room for 65536
 *    entries per queue) and data buffers.
 *  - h_hdr: per attacking vCPU, request headers and frames; devices only
 *    read it unless they take a read-only buffer for a writable one.
 *  - h_avail: one avail ring page per queue; any 16-bit value a device
 *    reads there or past it is a valid index into h_desc.
 * Queue address registers only ever hold our own rings (below 4 GiB) or
 * addresses outside RAM built so that even a VMM that takes only one half
 * of a 64-bit write gets an address outside RAM: the low half is our own
 * ring or in `gap` (16 MiB right past the RAM below 4 GiB, verified empty),
 * the high half 0 (with a gap low half) or at least `hmin` (every RAM entry
 * ends below hmin << 32). QueueReady is only ever written (whatever the
 * value) right after the selected queue's three addresses. Driver feature
 * writes never set VIRTIO_RING_F_EVENT_IDX or VIRTIO_F_RING_PACKED (whose
 * device writes would land past the used ring or in the descriptor table).
 * Legacy (version 1) transports get no ring attack and no write to
 * GuestPageSize, QueuePFN, the feature or the address registers.
 */
#define H_ATTACKERS 4                           /* vCPUs that attack virtio devices */
#define H_PRIV 256                              /* private descriptors per attacker */
#define H_FILL_FIRST (H_ATTACKERS * H_PRIV)     /* entries from here on: written at boot */
#define H_DESC_N (65536 + H_FILL_FIRST)
#define H_SINK (1u << 20)
#define H_USED_STRIDE (128u << 10)              /* used ring of queue q at sink + q * this */
#define H_DEVS 16
#define H_QUEUES 4
#define H_HDR 8192
#define H_AVAIL_SLOTS 2046                      /* ring entries in an avail page */
#define H_WINDOW (16ull << 20)                  /* verified-empty span past the end of RAM */
#define H_STOP_WAIT 10000000000ull              /* vCPUs must stop within 10 s */

#define VQ_F_NEXT 1
#define VQ_F_WRITE 2
#define VQ_F_INDIRECT 4

static struct vq_desc h_desc[H_DESC_N] __attribute__((aligned(4096)));
static u8 h_sink[H_SINK] __attribute__((aligned(4096)));
static u16 h_avail[H_DEVS][H_QUEUES][2048] __attribute__((aligned(4096)));
static u8 h_hdr[H_ATTACKERS][H_HDR] __attribute__((aligned(4096)));

struct hdev {
    volatile u8 *mmio;
    u64 base;
    u32 version, id;
    u32 cpu;    /* the vCPU attacking it (its private descriptors) */
    u32 nq;     /* queues of the last set-up */
    u16 num[H_QUEUES];
    u16 aidx[H_QUEUES];
    u64 sectors; /* disks: capacity read at the last set-up */
};
static struct hdev h_dev[H_DEVS];
static u32 h_ndev;

static struct {
    u64 seconds;
    u64 min_buf;   /* min_buf=: no buffer shorter (but zero-length ones) */
    u64 top;       /* end of the highest RAM entry */
    u64 gap;       /* H_WINDOW right past the RAM below 4 GiB, verified empty; 0 none */
    u64 straddle;  /* end of RAM whose last page is free and past which H_WINDOW is empty; 0 none */
    u32 hmin;      /* every RAM entry ends below hmin << 32 */
    u32 attackers; /* vCPUs 0..attackers-1 attack virtio devices */
    u64 deadline, next_line;
} h;

struct hcpu {
    u64 rng;
    u64 writes, notifies, rounds;
    u32 cpu;
    u32 priv_next; /* next private descriptor to use */
} __attribute__((aligned(64)));
static struct hcpu h_cpu[MAX_CPUS];
static volatile u32 h_go, h_stop, h_stopped;

static inline u64 h_rand(struct hcpu *c)
{
    c->rng += 0x9e3779b97f4a7c15ull;
    return mix64(c->rng);
}

/* Uniform in [0, n). */
static inline u32 h_below(struct hcpu *c, u64 n)
{
    return (u32)(((h_rand(c) >> 32) * n) >> 32);
}

static inline u64 h_below64(struct hcpu *c, u64 n)
{
    return (u64)(((unsigned __int128)h_rand(c) * n) >> 64);
}

/* A register value: half of the time one of the edge values. */
static u32 h_value(struct hcpu *c)
{
    static const u32 v[] = {0,      1,      2,       3,          4,          7,
                            8,      0xf,    0x10,    0x7f,       0x80,       0xff,
                            0x100,  0x3ff,  0x400,   0xfff,      0x1000,     0x7fff,
                            0x8000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff};
    if (h_below(c, 2))
        return (u32)h_rand(c);
    return v[h_below(c, sizeof v / sizeof v[0])];
}

/* ---- register access ---- */

static void h_mw(struct hcpu *c, struct hdev *d, u32 off, u32 size, u64 v)
{
    volatile u8 *p = d->mmio + off;
    if (size == 1)
        *(volatile u8 *)p = (u8)v;
    else if (size == 2)
        *(volatile u16 *)p = (u16)v;
    else if (size == 4)
        *(volatile u32 *)p = (u32)v;
    else
        *(volatile u64 *)p = v;
    c->writes++;
}

static u64 h_mr(struct hdev *d, u32 off, u32 size)
{
    volatile u8 *p = d->mmio + off;
    if (size == 1)
        return *(volatile u8 *)p;
    if (size == 2)
        return *(volatile u16 *)p;
    if (size == 4)
        return *(volatile u32 *)p;
    return *(volatile u64 *)p;
}

static void h_w32(struct hcpu *c, struct hdev *d, u32 off, u32 v)
{
    h_mw(c, d, off, 4, v);
}

static u32 h_r32(struct hdev *d, u32 off)
{
    return *(volatile u32 *)(d->mmio + off);
}

static void h_notify(struct hcpu *c, struct hdev *d, u32 v)
{
    *(volatile u32 *)(d->mmio + 0x50) = v;
    c->notifies++;
}

/* ---- time, progress, stop ---- */

static void h_totals(u64 *r, u64 *w, u64 *q)
{
    *r = *w = *q = 0;
    for (u32 i = 0; i < ncpus; i++) {
        *r += *(volatile u64 *)&h_cpu[i].rounds;
        *w += *(volatile u64 *)&h_cpu[i].writes;
        *q += *(volatile u64 *)&h_cpu[i].notifies;
    }
}

static void h_line(const char *what, const char *rounds)
{
    u64 r, w, q;
    h_totals(&r, &w, &q);
    lock_print();
    puts_("TESTGUEST HOSTILE ");
    puts_(what);
    puts_(rounds);
    put_dec(r);
    puts_(" writes=");
    put_dec(w);
    puts_(" notifies=");
    put_dec(q);
    puts_("\n");
    unlock_print();
}

/* Called between operations: publishes this vCPU's counters; on vCPU 0
 * also the progress line, the end of the run and vCPU 0's usual polls.
 * Returns nonzero once the run is over. Never called with the print lock
 * held. */
static int h_tick(struct hcpu *c)
{
    __asm__ volatile("" ::: "memory"); /* the counters reach memory */
    if (c->cpu == 0) {
        u64 t = now_ns();
        if (h.seconds && (int64_t)(t - h.deadline) >= 0) {
            h_stop = 1;
        } else if ((int64_t)(t - h.next_line) >= 0) {
            h.next_line += 1000000000ull;
            if ((int64_t)(t - h.next_line) >= 0)
                h.next_line = t + 1000000000ull;
            h_line("round=", "");
        }
        vcpu0_poll(); /* keep region, generation */
    }
    return h_stop;
}

/* ---- where devices may write ---- */

enum { T_SINK, T_HDR, T_GAP, T_HIGH, T_FAR, T_EDGE, T_STRADDLE, T_KINDS };

/* A buffer of (at most) `want` bytes a device may write whole: inside
 * h_sink or this vCPU's h_hdr (clamped to it), or outside RAM. With
 * min_buf= a nonzero length is at least that. */
static void h_target(struct hcpu *c, u32 kind, u64 want, u64 *addr, u32 *len)
{
    u64 a, max = 0xffffffffull, minb = h.min_buf;
    if (kind == T_GAP && !h.gap)
        kind = T_HIGH;
    if (kind == T_STRADDLE && !h.straddle)
        kind = T_FAR;
    if (want && want < minb)
        want = minb;
    switch (kind) {
    case T_SINK: {
        u64 off = h_below(c, H_SINK - minb + 1);
        a = (u64)h_sink + off;
        max = H_SINK - off;
        break;
    }
    case T_HDR: {
        u64 off = h_below(c, H_HDR - minb + 1);
        a = (u64)h_hdr[c->cpu % H_ATTACKERS] + off;
        max = H_HDR - off;
        break;
    }
    case T_GAP: {
        u64 off = h_below(c, H_WINDOW - minb + 1);
        a = h.gap + off;
        max = H_WINDOW - off;
        break;
    }
    case T_HIGH: /* past every RAM entry, up to 4 TiB further */
        a = ((u64)(h.hmin + h_below(c, 1024)) << 32) | (u32)h_rand(c);
        break;
    case T_FAR: /* beyond any physical address, never wrapping */
        a = (h_rand(c) & ((1ull << 62) - 1)) | (1ull << 52);
        break;
    case T_EDGE: { /* ends at (or before) 2^64 exactly */
        u64 r = minb + h_below(c, 1u << 20);
        a = 0 - r;
        max = r;
        if (h_below(c, 2))
            want = r;
        break;
    }
    default: { /* T_STRADDLE: starts in the last page of RAM, ends past it */
        u64 r = 1 + h_below(c, 4096);
        a = h.straddle - r;
        if (want <= r)
            want = r + 1 + h_below(c, 65536);
        max = r + H_WINDOW - 1;
        break;
    }
    }
    *addr = a;
    *len = (u32)(want < max ? want : max);
}

/* Any place outside RAM (or the edge/straddle cases). */
static u32 h_outside_kind(struct hcpu *c)
{
    static const u8 k[] = {T_GAP, T_HIGH, T_FAR, T_EDGE, T_STRADDLE};
    return k[h_below(c, sizeof k)];
}

/* Writes descriptor `e` so that every intermediate state is safe too (a
 * device may read it meanwhile): length 0 first, then the flags cleared,
 * the address, next, the new flags and last the length. */
static void h_desc_set(struct vq_desc *e, u64 addr, u32 len, u16 flags, u16 next)
{
    volatile struct vq_desc *v = e;
    v->len = 0;
    v->flags = 0;
    v->addr = addr;
    v->next = next;
    v->flags = flags;
    v->len = len;
}

/* An indirect table inside h_desc: entries [i, i + n) with any index of
 * the table (up to 65535) still inside h_desc. */
static void h_indirect(struct hcpu *c, u32 *i, u32 *len)
{
    *i = h_below(c, H_FILL_FIRST + 1);
    u32 m = 1 + h_below(c, 64);
    switch (h_below(c, 6)) {
    case 0:
        *len = 0;
        break;
    case 1:
        *len = 16 * m + 1 + h_below(c, 15); /* not a multiple of 16 */
        break;
    case 2:
        *len = 16 * (H_DESC_N - *i); /* all of the rest of the table */
        break;
    default:
        *len = 16 * m;
        break;
    }
}

/* Entry `i` of h_desc (at least H_FILL_FIRST) as written at boot. */
static void h_fill_entry(u32 i, struct vq_desc *e)
{
    struct hcpu t = {.rng = mix64(seed ^ 0x686f7374696c65ull ^ (u64)i * 0xd1342543de82ef95ull),
                     .cpu = 0};
    u64 addr;
    u32 len;
    u16 flags = h_below(&t, 4) == 0 ? VQ_F_NEXT : 0;
    u16 next = (u16)h_rand(&t);
    if (h_below(&t, 8) == 0) {
        u32 j;
        h_indirect(&t, &j, &len);
        addr = (u64)&h_desc[j];
        flags |= VQ_F_INDIRECT;
    } else {
        static const u8 k[] = {T_SINK, T_SINK, T_GAP, T_HIGH, T_FAR, T_EDGE, T_STRADDLE};
        u32 kind = k[h_below(&t, sizeof k)];
        u64 want = h_below(&t, 4) == 0 ? 0xffffffffull : h_below(&t, 65537);
        if (kind == T_HDR)
            kind = T_SINK;
        h_target(&t, kind, want, &addr, &len);
        if (h_below(&t, 2))
            flags |= VQ_F_WRITE;
    }
    e->addr = addr;
    e->len = len;
    e->flags = flags;
    e->next = next;
}

/* ---- queue addresses ---- */

/* Our own ring `which` (0 descriptors, 1 avail, 2 used) for queue q. */
static u64 h_own(struct hdev *d, u32 which, u32 q)
{
    if (which == 0)
        return (u64)&h_desc[d->cpu * H_PRIV];
    if (which == 1)
        return (u64)h_avail[d - h_dev][q % H_QUEUES];
    return (u64)h_sink + (q % H_QUEUES) * H_USED_STRIDE;
}

/* A queue address outside RAM whichever half of it a VMM takes: low half
 * our own ring or in the gap, high half 0 (only with a gap low half) or at
 * least hmin. */
static u64 h_reg_outside(struct hcpu *c, u64 own)
{
    u32 lo = (u32)own, hi;
    int gap_lo = h.gap && h_below(c, 2);
    if (gap_lo)
        lo = (u32)(h.gap + h_below(c, H_WINDOW - (1u << 20))); /* any alignment; the
                                                                  rings stay in the gap */
    switch (h_below(c, gap_lo ? 5 : 4)) {
    case 0:
        hi = h.hmin;
        break;
    case 1:
        hi = 0xffffffffu;
        break;
    case 2:
        hi = h.hmin + h_below(c, 256);
        break;
    case 3:
        hi = h.hmin + h_below(c, 0xffffffffull - h.hmin);
        break;
    default:
        hi = 0;
        break;
    }
    return (u64)hi << 32 | lo;
}

/* Writes the three ring addresses of queue q (the one selected): mode 0
 * our own rings, 1 each own or outside, 2 all outside. As halves in either
 * order or as one 64-bit write. */
static void h_qaddr(struct hcpu *c, struct hdev *d, u32 q, u32 mode)
{
    static const u32 reg[3] = {0x80, 0x90, 0xa0};
    for (u32 w = 0; w < 3; w++) {
        u64 own = h_own(d, w, q);
        u64 a = (mode == 0 || (mode == 1 && h_below(c, 2))) ? own : h_reg_outside(c, own);
        switch (h_below(c, 6)) {
        case 0:
            h_mw(c, d, reg[w], 8, a);
            break;
        case 1:
            h_w32(c, d, reg[w] + 4, (u32)(a >> 32));
            h_w32(c, d, reg[w], (u32)a);
            break;
        default:
            h_w32(c, d, reg[w], (u32)a);
            h_w32(c, d, reg[w] + 4, (u32)(a >> 32));
            break;
        }
    }
}

/* QueueReady (any value) for the selected queue, its addresses first. */
static void h_qready(struct hcpu *c, struct hdev *d, u32 q, u32 v)
{
    h_qaddr(c, d, q, h_below(c, 3));
    h_w32(c, d, 0x44, v);
}

/* Driver features: the select register, then a value without EVENT_IDX
 * (bit 29) and RING_PACKED (bit 34). */
static void h_features(struct hcpu *c, struct hdev *d, u32 sel, u32 v)
{
    if (sel == 0)
        v &= ~(1u << 29);
    else if (sel == 1)
        v &= ~(1u << 2);
    h_w32(c, d, 0x24, sel);
    h_w32(c, d, 0x20, v);
}

static u32 h_qsel_value(struct hcpu *c)
{
    static const u32 v[] = {0, 1, 2, 3, 4, 7, 8, 16, 0xff, 0x400, 0xffff, 0x10000, 0xffffffff};
    return h_below(c, 4) ? h_below(c, H_QUEUES) : v[h_below(c, sizeof v / sizeof v[0])];
}

static u32 h_qnum_value(struct hcpu *c)
{
    static const u32 v[] = {0,    1,    2,     3,     5,     7,     8,          100,
                            255,  256,  257,   1000,  1023,  1024,  1025,       4096,
                            32767, 32768, 32769, 65535, 65536, 65537, 0x80000000, 0xffffffff};
    return v[h_below(c, sizeof v / sizeof v[0])];
}

/* ---- register fuzzing ---- */

/* Bytes the fuzzer never writes blindly: the driver features and their
 * select, GuestPageSize, QueuePFN, QueueReady and the queue addresses. */
static int h_sensitive(u32 off, u32 size)
{
    u32 end = off + size;
    return (off < 0x2c && end > 0x20) || (off < 0x48 && end > 0x40) || (off < 0xa8 && end > 0x80);
}

static void h_reg_op(struct hcpu *c, struct hdev *d)
{
    int modern = d->version == 2;
    u32 sel = h_below(c, H_QUEUES); /* the queue the address helpers assume */
    u32 op = h_below(c, 20);
    if (op < 7) { /* anything anywhere */
        static const u8 sizes[] = {1, 2, 4, 4, 4, 8};
        u32 size = sizes[h_below(c, sizeof sizes)];
        u32 off = h_below(c, 0x200 - size + 1);
        if (h_below(c, 4))
            off &= ~(size - 1);
        if (!h_sensitive(off, size)) {
            u64 v = h_value(c);
            if (size == 8)
                v |= (u64)h_value(c) << 32;
            h_mw(c, d, off, size, v);
            return;
        }
        if (!modern) {
            (void)h_mr(d, off, size);
            return;
        }
        /* The register it hit, written the careful way. */
        if (off < 0x2c)
            op = 9;
        else if (off < 0x48 && off + size > 0x44)
            op = 13;
        else if (off < 0x48)
            op = 17;
        else
            op = 12;
    }
    switch (op) {
    case 7: /* reads anywhere, any size */
    case 8: {
        static const u8 sizes[] = {1, 2, 4, 4, 8};
        u32 size = sizes[h_below(c, sizeof sizes)];
        (void)h_mr(d, h_below(c, 0x200 - size + 1), size);
        break;
    }
    case 9: /* driver features */
        if (modern) {
            static const u32 s[] = {0, 1, 1, 0, 2, 3, 0xffffffff};
            h_features(c, d, s[h_below(c, sizeof s / sizeof s[0])], h_value(c));
        }
        break;
    case 10: { /* status: resets, DRIVER_OK without FEATURES_OK, FAILED, ... */
        static const u32 s[] = {0, 1, 3, 7, 0xb, 0xf, 0x4, 0x8, 0xc, 0x40, 0x80, 0xff, 0x8f};
        h_w32(c, d, 0x70, h_below(c, 4) ? s[h_below(c, sizeof s / sizeof s[0])] : h_value(c));
        break;
    }
    case 11: /* queue select, in range or not */
        sel = h_qsel_value(c);
        h_w32(c, d, 0x30, sel);
        if (h_below(c, 2))
            h_w32(c, d, 0x38, h_qnum_value(c));
        if (modern && h_below(c, 2))
            h_qready(c, d, sel, h_below(c, 4) ? 1 : h_value(c));
        if (h_below(c, 2))
            h_notify(c, d, h_below(c, 2) ? sel : h_value(c));
        break;
    case 12: /* queue addresses */
        if (modern)
            h_qaddr(c, d, sel, 1 + h_below(c, 2));
        break;
    case 13: /* QueueReady toggles */
        if (modern) {
            h_qready(c, d, sel, h_below(c, 2));
            if (h_below(c, 2))
                h_qready(c, d, sel, h_below(c, 3) ? 1 : h_value(c));
        }
        break;
    case 14: /* QueueNum: 0, huge, not a power of two */
        h_w32(c, d, 0x38, h_qnum_value(c));
        break;
    case 15: /* notifications, valid queue or not */
        for (u32 n = 1 + h_below(c, 8); n; n--)
            h_notify(c, d, h_below(c, 2) ? h_below(c, H_QUEUES) : h_value(c));
        break;
    case 16: { /* config space, any size */
        static const u8 sizes[] = {1, 1, 2, 4, 8};
        u32 size = sizes[h_below(c, sizeof sizes)];
        u64 v = h_value(c) | (u64)h_value(c) << 32;
        h_mw(c, d, 0x100 + h_below(c, 0x100 - size + 1), size, v);
        break;
    }
    case 17: /* QueuePFN (legacy): 0 or a page frame outside RAM */
        if (modern)
            h_w32(c, d, 0x40, h_below(c, 2) ? 0 : (h.hmin << 20) + h_below(c, 1u << 20));
        break;
    default: { /* the rest: feature select, interrupt ack, queue reset, shm select */
        static const u32 r[] = {0x14, 0x64, 0xc0, 0xac, 0x3c, 0xfc, 0x0c};
        h_w32(c, d, r[h_below(c, sizeof r / sizeof r[0])], h_value(c));
        (void)h_r32(d, 0x10);
        break;
    }
    }
}

/* ---- well-formed-looking requests ---- */

struct hbuf {
    u64 addr;
    u32 len;
    u16 flags;
};

/* The shape of a plausible request on queue q of device d: disks a
 * header, data and a status byte; network adapters a receive buffer, a
 * header and a frame, or a control command; anything else a readable and
 * a writable buffer. Headers and frames are written to h_hdr. Returns the
 * number of buffers (1 to 3). */
static u32 h_shape(struct hcpu *c, struct hdev *d, u32 q, struct hbuf *b, int hostile_hdr)
{
    u8 *hdr = h_hdr[d->cpu];
    u32 n = 0;
    if (d->id == VIRTIO_ID_BLOCK) {
        static const u32 types[] = {0, 0, 1, 1, 4, 8};
        static const u32 bad_types[] = {2, 3, 5, 8, 10, 11, 13, 14, 0x7fffffff, 0xffffffff};
        u32 type = types[h_below(c, sizeof types / sizeof types[0])];
        u64 lim = d->sectors > 8 ? d->sectors : 8, sector = h_below64(c, lim < 4096 ? lim : 4096);
        if (hostile_hdr) {
            static const u64 s[] = {0, 1, 0x7fffffffffffffffull, 0xffffffffffffffffull,
                                    0xfffffffffffffff8ull, 1ull << 55};
            type = h_below(c, 2) ? bad_types[h_below(c, sizeof bad_types / sizeof bad_types[0])]
                                 : types[h_below(c, sizeof types / sizeof types[0])];
            switch (h_below(c, 4)) {
            case 0:
                sector = d->sectors;
                break;
            case 1:
                sector = d->sectors - 1 + h_below(c, 3);
                break;
            case 2:
                sector = s[h_below(c, sizeof s / sizeof s[0])];
                break;
            default:
                sector = h_rand(c);
                break;
            }
        }
        volatile u32 *h32 = (volatile u32 *)hdr;
        h32[0] = type;
        h32[1] = hostile_hdr ? (u32)h_rand(c) : 0;
        *(volatile u64 *)(hdr + 8) = sector;
        b[n++] = (struct hbuf){(u64)hdr, 16, 0};
        if (type == 11 || type == 13 || type == 14) {
            /* discard / write zeroes / secure erase: one segment */
            volatile u64 *seg = (volatile u64 *)(hdr + 32);
            seg[0] = hostile_hdr ? h_rand(c) : sector;
            seg[1] = hostile_hdr ? h_rand(c) : (8 | (u64)(h_below(c, 2)) << 32);
            b[n++] = (struct hbuf){(u64)(hdr + 32), 16, 0};
        } else if (type != 4) {
            u32 len = type == 8 ? 20 : 512 * (1 + h_below(c, 8));
            h_target(c, type == 1 ? T_HDR : T_SINK, len, &b[n].addr, &b[n].len);
            b[n++].flags = type == 1 ? 0 : VQ_F_WRITE;
        }
        h_target(c, T_SINK, 1, &b[n].addr, &b[n].len);
        b[n++].flags = VQ_F_WRITE;
        return n;
    }
    if (d->id == VIRTIO_ID_NET && q == 2) {
        /* control queue: class, command, data, ack */
        hdr[48] = (u8)(hostile_hdr ? h_rand(c) : h_below(c, 6));
        hdr[49] = (u8)(hostile_hdr ? h_rand(c) : h_below(c, 6));
        for (u32 i = 0; i < 64; i++)
            hdr[192 + i] = (u8)h_rand(c);
        b[n++] = (struct hbuf){(u64)(hdr + 48), 2, 0};
        b[n++] = (struct hbuf){(u64)(hdr + 192), 1 + h_below(c, 64), 0};
        h_target(c, T_SINK, 1, &b[n].addr, &b[n].len);
        b[n++].flags = VQ_F_WRITE;
        return n;
    }
    if (d->id == VIRTIO_ID_NET && (q & 1)) {
        /* transmit: virtio_net_hdr_v1, then a broadcast frame of an
         * experimental EtherType with random payload */
        volatile u8 *vh = hdr + 96;
        for (u32 i = 0; i < 12; i++)
            vh[i] = hostile_hdr ? (u8)h_rand(c) : 0;
        u32 flen = 60 + h_below(c, 1455);
        if (hostile_hdr) {
            static const u32 l[] = {0, 1, 13, 14, 15, 59, 1515, 1518, 4096, H_HDR - 128};
            flen = l[h_below(c, sizeof l / sizeof l[0])];
        }
        u8 *f = hdr + 128;
        for (u32 i = 0; i < 64 && i < H_HDR - 128; i++)
            f[i] = (u8)h_rand(c);
        for (u32 i = 0; i < 6; i++)
            f[i] = 0xff;
        f[6] = 0x02;
        f[12] = 0x88;
        f[13] = 0xb5;
        if (h_below(c, 2)) {
            b[n++] = (struct hbuf){(u64)vh, 12, 0};
            b[n++] = (struct hbuf){(u64)f, flen, 0};
        } else { /* header and frame in one buffer */
            for (u32 i = 0; i < 12; i++)
                (f - 12)[i] = vh[i];
            b[n++] = (struct hbuf){(u64)(f - 12), flen + 12, 0};
        }
        return n;
    }
    if (d->id == VIRTIO_ID_NET) {
        /* receive: one buffer for a header and a frame */
        h_target(c, T_SINK, 12 + 1514, &b[n].addr, &b[n].len);
        b[n++].flags = VQ_F_WRITE;
        return n;
    }
    b[n++] = (struct hbuf){(u64)(hdr + h_below(c, 256)), 1 + h_below(c, 256), 0};
    h_target(c, T_SINK, 1 + h_below(c, 4096), &b[n].addr, &b[n].len);
    b[n++].flags = VQ_F_WRITE;
    return n;
}

/* `n` private descriptors in a row, returned as the first index relative
 * to this vCPU's table: below `num` (the queue size) if they fit there, so
 * that a request is invalid only where it means to be. */
static u32 h_alloc(struct hcpu *c, u32 n, u32 num)
{
    u32 lim = num < H_PRIV ? num : H_PRIV;
    if (n > lim)
        lim = H_PRIV;
    if (c->priv_next + n > lim)
        c->priv_next = 0;
    u32 i = c->priv_next;
    c->priv_next += n;
    return i;
}

static struct vq_desc *h_priv(struct hdev *d, u32 i)
{
    return &h_desc[d->cpu * H_PRIV + i];
}

/* Writes buffers b[0..n) as a chain at private entries [s, s + n) (next
 * indices relative to `rel`, the table the device sees them in). */
static void h_write_chain(struct hdev *d, u32 s, u32 rel, const struct hbuf *b, u32 n)
{
    for (u32 i = 0; i < n; i++)
        h_desc_set(h_priv(d, s + i), b[i].addr, b[i].len,
                   (u16)(b[i].flags | (i + 1 < n ? VQ_F_NEXT : 0)), (u16)(s + i + 1 - rel));
}

enum {
    C_BENIGN,
    C_OUTSIDE,
    C_HUGE,
    C_ZERO,
    C_SWAPPED,
    C_SELFLOOP,
    C_LOOP,
    C_LONG,
    C_INDIRECT,
    C_BADNEXT,
    C_BADHEAD,
    C_STRADDLE,
    C_EDGE,
    C_BADHDR,
    C_MANY,
    C_KINDS
};

/* Builds one request for queue q, of the given kind (C_KINDS: a random
 * one), and returns the head index to post (relative to the queue's
 * descriptor table). */
static u16 h_chain(struct hcpu *c, struct hdev *d, u32 q, u32 kind)
{
    struct hbuf b[4];
    if (kind >= C_KINDS)
        kind = h_below(c, C_KINDS);
    u32 num = d->num[q] ? d->num[q] : 1;
    if (kind == C_BADHEAD) {
        static const u32 heads[] = {0xffff, 0x8000, 0x100, 0xff};
        return (u16)(h_below(c, 2) ? num + h_below(c, 8) : heads[h_below(c, 4)]);
    }
    if (kind == C_LONG || kind == C_MANY) {
        /* Longer than the queue (when it is small), or just many small
         * pieces: up to 255 descriptors, each a sink buffer. */
        u32 n = kind == C_LONG ? num + 1 + h_below(c, 64) : 2 + h_below(c, 200);
        if (n > H_PRIV - 1)
            n = H_PRIV - 1;
        u32 s = h_alloc(c, n, num);
        for (u32 i = 0; i < n; i++) {
            u64 a;
            u32 len;
            h_target(c, T_SINK, kind == C_MANY ? 1 : 1 + h_below(c, 4096), &a, &len);
            u16 fl = (u16)((i >= n / 2 ? VQ_F_WRITE : 0) | (i + 1 < n ? VQ_F_NEXT : 0));
            h_desc_set(h_priv(d, s + i), a, len, fl, (u16)(s + i + 1));
        }
        return (u16)s;
    }
    u32 n = h_shape(c, d, q, b, kind == C_BADHDR);
    u32 victim = h_below(c, n);
    switch (kind) {
    case C_OUTSIDE:
        for (u32 i = 0; i < n; i++)
            if (i == victim || h_below(c, 2))
                h_target(c, h_outside_kind(c), b[i].len ? b[i].len : 1, &b[i].addr, &b[i].len);
        break;
    case C_HUGE: {
        static const u32 l[] = {0xffffffff, 0xfffffff0, 0x80000000, 0x7fffffff, 0x10000000};
        h_target(c, h_below(c, 2) ? T_HIGH : T_FAR, l[h_below(c, 5)], &b[victim].addr,
                 &b[victim].len);
        break;
    }
    case C_ZERO:
        for (u32 i = 0; i < n; i++)
            if (i == victim || h_below(c, 3) == 0)
                b[i].len = 0;
        break;
    case C_SWAPPED:
        for (u32 i = 0; i < n; i++)
            b[i].flags ^= VQ_F_WRITE;
        break;
    case C_STRADDLE:
        h_target(c, T_STRADDLE, b[victim].len, &b[victim].addr, &b[victim].len);
        break;
    case C_EDGE:
        h_target(c, T_EDGE, b[victim].len, &b[victim].addr, &b[victim].len);
        break;
    default:
        break;
    }
    if (kind == C_INDIRECT) {
        /* The request as an indirect table (private entries s..s+n-1,
         * next relative to the table), behind a head with the indirect
         * flag; or a broken indirect head. */
        u32 s = h_alloc(c, n + 1, num), head = s + n, len = 16 * n;
        u64 addr = (u64)h_priv(d, s);
        u16 fl = VQ_F_INDIRECT, next = 0;
        h_write_chain(d, s, s, b, n);
        switch (h_below(c, 8)) {
        case 0:
            len = 0;
            break;
        case 1:
            len = 16 * n + 1 + h_below(c, 15);
            break;
        case 2: { /* a nested indirect entry inside the table */
            u32 j, jl;
            h_indirect(c, &j, &jl);
            h_desc_set(h_priv(d, s + h_below(c, n)), (u64)&h_desc[j], jl,
                       (u16)(VQ_F_INDIRECT | (h_below(c, 2) ? VQ_F_NEXT : 0)), (u16)h_below(c, n + 2));
            break;
        }
        case 3: { /* most of h_desc as one table */
            u32 i = (u32)(addr - (u64)h_desc) / 16;
            len = 16 * (H_DESC_N - i);
            break;
        }
        case 4: /* outside RAM */
            h_target(c, h_below(c, 2) ? T_HIGH : T_FAR, h_below(c, 2) ? 0xffffffff : 0xfffffff0,
                     &addr, &len);
            break;
        case 5: /* indirect and next */
            fl |= VQ_F_NEXT;
            next = (u16)(h_below(c, 2) ? head : h_below(c, 65536));
            break;
        default:
            break;
        }
        h_desc_set(h_priv(d, head), addr, len, fl, next);
        return (u16)head;
    }
    u32 s = h_alloc(c, n, num);
    h_write_chain(d, s, 0, b, n);
    switch (kind) {
    case C_SELFLOOP: {
        u32 i = s + victim;
        h_desc_set(h_priv(d, i), b[victim].addr, b[victim].len, (u16)(b[victim].flags | VQ_F_NEXT),
                   (u16)i);
        break;
    }
    case C_LOOP: {
        u32 i = s + n - 1;
        h_desc_set(h_priv(d, i), b[n - 1].addr, b[n - 1].len, (u16)(b[n - 1].flags | VQ_F_NEXT),
                   (u16)(s + h_below(c, n)));
        break;
    }
    case C_BADNEXT: {
        u32 i = s + victim;
        u16 next = (u16)(h_below(c, 2) ? num + h_below(c, 4) : h_rand(c));
        h_desc_set(h_priv(d, i), b[victim].addr, b[victim].len, (u16)(b[victim].flags | VQ_F_NEXT),
                   next);
        break;
    }
    default:
        break;
    }
    return (u16)s;
}

/* Makes `head` available on queue q: the ring slot, then the index. */
static void h_post(struct hdev *d, u32 q, u16 head)
{
    volatile u16 *av = h_avail[d - h_dev][q];
    u32 num = d->num[q] ? d->num[q] : 1;
    u32 slot = d->aidx[q] % num;
    if (slot < H_AVAIL_SLOTS)
        av[2 + slot] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    d->aidx[q]++;
    av[1] = d->aidx[q];
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Thousands of QueueNotify writes in a row. */
static void h_storm(struct hcpu *c, struct hdev *d, u32 q)
{
    u32 n = 1000 + h_below(c, 3001);
    for (u32 i = 0; i < n; i++) {
        if ((i & 63) == 0 && h_tick(c))
            return;
        h_notify(c, d, h_below(c, 16) ? q : h_value(c));
    }
}

/* Sets device d up the way the drivers do (with a random twist: no
 * FEATURES_OK, queues made ready before the features, no DRIVER_OK, odd
 * queue sizes or ring addresses outside RAM), then posts hostile
 * requests, and maybe jumps the avail index, resets in flight, toggles
 * QueueReady or storms. */
static void h_ring_attack(struct hcpu *c, struct hdev *d)
{
    u32 var = h_below(c, 10);
    h_w32(c, d, 0x70, 0);
    h_w32(c, d, 0x70, 1);
    h_w32(c, d, 0x70, 1 | 2);
    for (u32 pass = 0; pass < 2; pass++) {
        if ((pass == 0) != (var == 5)) { /* features; var 5: after the queues */
            h_w32(c, d, 0x14, 0);
            u64 offered = h_r32(d, 0x10);
            h_w32(c, d, 0x14, 1);
            offered |= (u64)h_r32(d, 0x10) << 32;
            u64 want = offered & (h_rand(c) | (1ull << 32));
            if (h_below(c, 5) == 0)
                want = h_rand(c);
            h_features(c, d, 0, (u32)want);
            h_features(c, d, 1, (u32)(want >> 32));
            if (var != 4) /* var 4: never FEATURES_OK */
                h_w32(c, d, 0x70, 1 | 2 | 8);
        } else { /* queues */
            d->nq = 0;
            for (u32 q = 0; q < H_QUEUES; q++) {
                h_w32(c, d, 0x30, q);
                u32 max = h_r32(d, 0x34);
                if (!max)
                    break;
                u32 num = 16u << h_below(c, 5); /* 16 to 256, at most max */
                if (num > max)
                    num = max;
                while (num & (num - 1))
                    num &= num - 1;
                if (var == 7 || h_below(c, 8) == 0) {
                    const u32 odd[] = {1, 2, 3, 5, 6, 100, max, max + 1, 0};
                    num = odd[h_below(c, sizeof odd / sizeof odd[0])];
                }
                volatile u16 *av = h_avail[d - h_dev][q];
                av[0] = (u16)h_below(c, 2); /* VRING_AVAIL_F_NO_INTERRUPT, or not */
                av[1] = 0;
                d->aidx[q] = 0;
                d->num[q] = (u16)num;
                h_w32(c, d, 0x38, num);
                h_qaddr(c, d, q, var == 8 ? 1 + h_below(c, 2) : 0);
                h_w32(c, d, 0x44, 1);
                d->nq = q + 1;
            }
        }
    }
    if (var != 6) /* var 6: never DRIVER_OK */
        h_w32(c, d, 0x70, (var == 4 ? 1 | 2 : 1 | 2 | 8) | 4);
    if (d->id == VIRTIO_ID_BLOCK)
        d->sectors = h_r32(d, 0x100) | (u64)h_r32(d, 0x104) << 32;
    if (!d->nq)
        return;
    /* Well-formed requests first (the device does real work; a disk reads
     * and writes its first sectors), unless the set-up was broken. */
    if (var < 4) {
        for (u32 q = 0; q < d->nq; q++)
            h_post(d, q, h_chain(c, d, q, C_BENIGN));
        for (u32 q = 0; q < d->nq; q++)
            h_notify(c, d, q);
    }
    for (u32 k = 1 + h_below(c, 6); k; k--) {
        u32 q = h_below(c, d->nq);
        u32 posts = 1 + h_below(c, 3);
        for (u32 i = 0; i < posts; i++)
            h_post(d, q, h_chain(c, d, q, C_KINDS));
        h_notify(c, d, q);
        if (h_tick(c))
            return;
    }
    u32 q = h_below(c, d->nq);
    if (h_below(c, 6) == 0) { /* the avail index far ahead of the ring */
        d->aidx[q] += (u16)(d->num[q] + 1 + h_below(c, 65000));
        h_post(d, q, h_chain(c, d, q, C_KINDS));
        h_notify(c, d, q);
    }
    if (h_below(c, 8) == 0) { /* QueueReady toggled on a live queue */
        h_w32(c, d, 0x30, q);
        h_qready(c, d, q, 0);
        h_qready(c, d, q, 1);
        h_notify(c, d, q);
    }
    if (h_below(c, 4) == 0) /* a queue that does not exist */
        h_notify(c, d, h_below(c, 2) ? d->nq + h_below(c, 4) : h_value(c));
    if (h_below(c, 6) == 0)
        h_storm(c, d, q);
    if (h_below(c, 8) == 0) { /* reset with requests in flight */
        h_post(d, q, h_chain(c, d, q, C_KINDS));
        h_notify(c, d, q);
        h_w32(c, d, 0x70, 0);
        h_notify(c, d, q);
    }
}

/* ---- port I/O ---- */

static inline void h_out(u16 port, u32 size, u32 v)
{
    if (size == 1)
        outb(port, (u8)v);
    else if (size == 2)
        outw(port, (u16)v);
    else
        outl(port, v);
}

static inline u32 h_in(u16 port, u32 size)
{
    if (size == 1)
        return inb(port);
    if (size == 2)
        return inw(port);
    return inl(port);
}

/* COM1: random writes and reads of 0x3f8-0x3ff under the print lock, with
 * the UART in loopback mode throughout (every byte written to MCR keeps
 * bit 4), so nothing reaches the serial output; then the registers are
 * restored and the receive FIFO drained. */
static void h_com1(struct hcpu *c, u32 n)
{
    lock_print();
    u8 mcr = inb(SERIAL_PORT + 4), lcr = inb(SERIAL_PORT + 3), scr = inb(SERIAL_PORT + 7);
    outb(SERIAL_PORT + 4, (u8)(mcr | 0x10));
    outb(SERIAL_PORT + 3, (u8)(lcr & 0x7f));
    u8 ier = inb(SERIAL_PORT + 1);
    outb(SERIAL_PORT + 3, (u8)(lcr | 0x80));
    u8 dll = inb(SERIAL_PORT), dlm = inb(SERIAL_PORT + 1);
    outb(SERIAL_PORT + 3, (u8)(lcr & 0x7f));
    c->writes += 5;
    for (u32 i = 0; i < n; i++) {
        static const u8 sizes[] = {1, 1, 1, 1, 2, 4};
        u32 size = sizes[h_below(c, sizeof sizes)];
        u16 port = (u16)(SERIAL_PORT + h_below(c, 8 - size + 1));
        if (h_below(c, 4) == 0) {
            (void)h_in(port, size);
            continue;
        }
        u32 v = h_value(c);
        for (u32 b = 0; b < size; b++) /* a byte that lands on MCR keeps loopback */
            if (port + b == SERIAL_PORT + 4)
                v |= 0x10u << (8 * b);
        h_out(port, size, v);
        c->writes++;
    }
    outb(SERIAL_PORT + 3, (u8)(lcr | 0x80));
    outb(SERIAL_PORT, dll);
    outb(SERIAL_PORT + 1, dlm);
    outb(SERIAL_PORT + 3, lcr);
    outb(SERIAL_PORT + 1, ier);
    outb(SERIAL_PORT + 2, 0); /* FIFOs off, as at boot */
    outb(SERIAL_PORT + 7, scr);
    for (u32 i = 0; i < 64 && (inb(SERIAL_PORT + 5) & 1); i++)
        (void)inb(SERIAL_PORT);
    outb(SERIAL_PORT + 4, mcr); /* loopback off: output again */
    c->writes += 8;
    unlock_print();
}

/* The i8042: random data bytes to 0x60 and commands to 0x64, never one
 * that resets or touches the output port or A20: no 0xf0-0xff (pulse
 * output lines; 0xfe is the reset), no 0xd1 (write output port), no
 * 0xdd/0xdf (A20). */
static void h_i8042(struct hcpu *c, u32 n)
{
    for (u32 i = 0; i < n; i++) {
        switch (h_below(c, 4)) {
        case 0: {
            u8 v;
            do
                v = (u8)h_rand(c);
            while (v >= 0xf0 || v == 0xd1 || v == 0xdd || v == 0xdf);
            outb(0x64, v);
            c->writes++;
            break;
        }
        case 1:
            outb(0x60, (u8)h_rand(c));
            c->writes++;
            break;
        case 2:
            (void)inb(0x60);
            break;
        default:
            (void)inb(0x64);
            break;
        }
    }
}

/* The generation ports 0x540-0x54f: random writes of 1, 2 and 4 bytes
 * and reads. They are read-only: a word that afterwards holds the last
 * value written to it as a whole (and changed) took the write, a FAIL. */
static void h_generation(struct hcpu *c, u32 n)
{
    u32 before[4], after[4], last[4] = {0, 0, 0, 0}, wrote = 0;
    vmgen_read(before);
    for (u32 i = 0; i < n; i++) {
        static const u8 sizes[] = {1, 2, 4, 4};
        u32 size = sizes[h_below(c, sizeof sizes)];
        u16 port = (u16)(VMGEN_PORT + h_below(c, 16 - size + 1));
        if (h_below(c, 3) == 0) {
            (void)h_in(port, size);
            continue;
        }
        u32 v = h_value(c);
        h_out(port, size, v);
        c->writes++;
        if (size == 4 && (port & 3) == 0) {
            last[(port - VMGEN_PORT) / 4] = v;
            wrote |= 1u << ((port - VMGEN_PORT) / 4);
        }
    }
    vmgen_read(after);
    for (u32 w = 0; w < 4; w++) {
        if (!((wrote >> w) & 1) || after[w] == before[w] || after[w] != last[w])
            continue;
        lock_print();
        puts_("TESTGUEST FAIL vcpu=");
        put_dec(c->cpu);
        puts_(" workload=hostile generation port=");
        put_hex(VMGEN_PORT + 4 * w);
        puts_(" took a write: before=");
        put_hex(before[w]);
        puts_(" written=");
        put_hex(last[w]);
        puts_(" now=");
        put_hex(after[w]);
        puts_("\n");
        unlock_print();
        __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
        guest_exit(STATUS_VERIFY_FAILED);
        sys_halt();
    }
}

static void h_ports(struct hcpu *c)
{
    for (u32 k = 0; k < 3; k++) {
        u32 which = h_below(c, 3);
        if (which == 0)
            h_com1(c, 8 + h_below(c, 33));
        else if (which == 1)
            h_i8042(c, 4 + h_below(c, 17));
        else
            h_generation(c, 4 + h_below(c, 13));
        if (h_tick(c))
            return;
    }
}

/* ---- set-up (vCPU 0, before READY) and the run ---- */

/* The size of the n-th virtio_mmio.device= window (decimal with an
 * optional K or M, or 0x hex); 4096 if unreadable. */
static u64 h_window_size(u32 n)
{
    const char *v = arg_nth("virtio_mmio.device", n);
    u64 r = 0;
    int base = 10, digits = 0;
    if (!v)
        return 4096;
    if (v[0] == '0' && v[1] == 'x') {
        base = 16;
        v += 2;
    }
    for (;; v++, digits++) {
        u32 dgt;
        if (*v >= '0' && *v <= '9')
            dgt = (u32)(*v - '0');
        else if (base == 16 && *v >= 'a' && *v <= 'f')
            dgt = (u32)(*v - 'a' + 10);
        else if (base == 16 && *v >= 'A' && *v <= 'F')
            dgt = (u32)(*v - 'A' + 10);
        else
            break;
        r = r * (u64)base + dgt;
    }
    if (*v == 'K' || *v == 'k')
        r <<= 10;
    else if (*v == 'M' || *v == 'm')
        r <<= 20;
    return digits && r ? r : 4096;
}

/* [a, a + len) is in no memory-map entry (of any type) and no device
 * window named on the command line. */
static int h_empty(const struct hvm_start_info *si, u64 a, u64 len)
{
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (e[i].addr < a + len && a < e[i].addr + e[i].size)
            return 0;
    u32 entries = arg_count("virtio_mmio.device");
    for (u32 n = 0; n < entries; n++) {
        u64 base;
        u32 irq;
        if (virtio_mmio_device(n, &base, &irq) && base < a + len && a < base + h_window_size(n))
            return 0;
    }
    return 1;
}

static void hostile_prepare(const struct hvm_start_info *si)
{
    const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
    u64 top = 0, low = 0;
    for (u32 i = 0; i < si->memmap_entries; i++) {
        if (e[i].type != 1)
            continue;
        u64 end = e[i].addr + e[i].size;
        if (end > top)
            top = end;
        if (end <= (4ull << 30) && end > low)
            low = end;
    }
    h.top = top;
    h.hmin = (u32)((top + (4ull << 30) - 1) >> 32);
    if (h.hmin == 0)
        h.hmin = 1;
    if (low && low + H_WINDOW <= 0xfe000000ull && h_empty(si, low, H_WINDOW))
        h.gap = low;
    /* The last page of RAM is free if it lies above the image and the
     * keep region (hostile has no memstamp area). */
    u64 floor = ((u64)_end + (2ull << 20) - 1) & ~((2ull << 20) - 1);
    if (floor < AREA_MIN_BASE)
        floor = AREA_MIN_BASE;
    if (keep.ranges) {
        const struct range *k = &keep.area[keep.ranges - 1];
        if (k->base + k->pages * PAGE_SIZE > floor)
            floor = k->base + k->pages * PAGE_SIZE;
    }
    if (top >= floor + PAGE_SIZE && (top >= (4ull << 30) || top + H_WINDOW <= 0xfe000000ull) &&
        h_empty(si, top, H_WINDOW))
        h.straddle = top;

    u32 entries = arg_count("virtio_mmio.device");
    for (u32 n = 0; n < entries && h_ndev < H_DEVS; n++) {
        u64 base;
        u32 irq;
        if (!virtio_mmio_device(n, &base, &irq))
            continue;
        int dup = 0;
        for (u32 i = 0; i < h_ndev; i++)
            dup |= h_dev[i].base == base;
        if (dup || ((volatile u32 *)base)[0] != 0x74726976)
            continue;
        struct hdev *d = &h_dev[h_ndev++];
        d->base = base;
        d->mmio = (volatile u8 *)base;
        d->version = ((volatile u32 *)base)[1];
        d->id = ((volatile u32 *)base)[2];
    }
    h.attackers = ncpus < H_ATTACKERS ? ncpus : H_ATTACKERS;
    if (h.attackers > h_ndev)
        h.attackers = h_ndev;
    for (u32 i = 0; i < h_ndev; i++)
        h_dev[i].cpu = i % h.attackers;

    for (u32 i = 0; i < H_DESC_N; i++) {
        if (i >= H_FILL_FIRST) {
            h_fill_entry(i, &h_desc[i]);
        } else { /* private entries start as zero-length sink buffers */
            h_desc[i].addr = (u64)h_sink;
            h_desc[i].len = 0;
            h_desc[i].flags = 0;
            h_desc[i].next = 0;
        }
    }
}

/* The entries written at boot are still as written (nothing wrote into
 * the guest's descriptor table). */
static void h_check_table(void)
{
    for (u32 i = H_FILL_FIRST; i < H_DESC_N; i++) {
        struct vq_desc want;
        h_fill_entry(i, &want);
        volatile struct vq_desc *got = &h_desc[i];
        if (got->addr == want.addr && got->len == want.len && got->flags == want.flags &&
            got->next == want.next)
            continue;
        lock_print();
        puts_("TESTGUEST FAIL vcpu=0 workload=hostile descriptor table entry=");
        put_dec(i);
        puts_(" addr=");
        put_hex((u64)got);
        puts_(" expected=");
        put_hex(want.addr);
        puts_(",");
        put_hex(want.len);
        puts_(" found=");
        put_hex(got->addr);
        puts_(",");
        put_hex(got->len);
        puts_("\n");
        unlock_print();
        __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
        guest_exit(STATUS_VERIFY_FAILED);
        sys_halt();
    }
}

static void hostile(u32 cpu)
{
    struct hcpu *c = &h_cpu[cpu];
    c->cpu = cpu;
    c->rng = mix64(seed ^ 0x486f7374696c6521ull ^ ((u64)cpu + 1) * 0x9e3779b97f4a7c15ull);
    if (cpu == 0) {
        lock_print();
        puts_("TESTGUEST HOSTILE start seed=");
        put_dec(seed);
        puts_(" seconds=");
        put_dec(h.seconds);
        puts_(" devices=");
        put_dec(h_ndev);
        puts_("\n");
        puts_("TESTGUEST HOSTILE layout ram_top=");
        put_hex(h.top);
        puts_(" gap=");
        if (h.gap)
            put_hex(h.gap);
        else
            puts_("none");
        puts_(" straddle=");
        if (h.straddle)
            put_hex(h.straddle);
        else
            puts_("none");
        puts_(" outside=");
        put_hex((u64)h.hmin << 32);
        puts_(" attackers=");
        put_dec(h.attackers);
        puts_(" min_buf=");
        put_dec(h.min_buf);
        for (u32 i = 0; i < h_ndev; i++) {
            puts_(" dev");
            put_dec(i);
            puts_("=");
            put_hex(h_dev[i].base);
            puts_(",id=");
            put_dec(h_dev[i].id);
            puts_(",v=");
            put_dec(h_dev[i].version);
            puts_(",vcpu=");
            put_dec(h_dev[i].cpu);
        }
        puts_("\n");
        unlock_print();
        u64 t = now_ns();
        h.deadline = t + h.seconds * 1000000000ull;
        h.next_line = t + 1000000000ull;
        __atomic_store_n(&h_go, 1, __ATOMIC_SEQ_CST);
    } else {
        while (!h_go)
            cpu_relax();
    }
    while (!h_tick(c)) {
        for (u32 i = 0; i < h_ndev && !h_stop; i++) {
            struct hdev *d = &h_dev[i];
            if (d->cpu != cpu)
                continue;
            for (u32 n = 16 + h_below(c, 49); n && !h_tick(c); n--)
                h_reg_op(c, d);
            if (d->version == 2 && !h_tick(c))
                h_ring_attack(c, d);
        }
        if (!h_stop)
            h_ports(c);
        c->rounds++;
    }
    /* Leave the devices reset. */
    for (u32 i = 0; i < h_ndev; i++)
        if (h_dev[i].cpu == cpu)
            h_w32(c, &h_dev[i], 0x70, 0);
    __atomic_add_fetch(&h_stopped, 1, __ATOMIC_SEQ_CST);
    if (cpu == 0) {
        u64 t0 = now_ns();
        while (h_stopped < ncpus) {
            if (now_ns() - t0 > H_STOP_WAIT) {
                lock_print();
                puts_("TESTGUEST FAIL vcpu=0 workload=hostile only ");
                put_dec(h_stopped);
                puts_(" of ");
                put_dec(ncpus);
                puts_(" vCPUs stopped within 10 s\n");
                unlock_print();
                __atomic_store_n(&failed, 1, __ATOMIC_SEQ_CST);
                guest_exit(STATUS_VERIFY_FAILED);
                sys_halt();
            }
            cpu_relax();
        }
        h_check_table();
        h_line("done ", "rounds=");
    }
    finish_cpu();
}
