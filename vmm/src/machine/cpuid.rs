//! The CPUID presented to each vCPU: KVM_GET_SUPPORTED_CPUID, with per-vCPU
//! APIC ids, the hypervisor bit, and nothing the host KVM cannot run.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: CMPXCHG16B. KVM reports it, but the emulating backend on the
/// development machines cannot execute it at CPL 0.
pub const ECX_CX16: u32 = 1 << 13;
/// Leaf 1 ECX: XSAVE (not emulated at CPL 0 either).
pub const ECX_XSAVE: u32 = 1 << 26;
/// Leaf 1 ECX: OSXSAVE.
pub const ECX_OSXSAVE: u32 = 1 << 27;
/// Leaf 1 ECX: AVX (needs XSAVE).
pub const ECX_AVX: u32 = 1 << 28;
/// Leaf 1 ECX: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multi-threading (the logical-processor count is valid).
pub const EDX_HTT: u32 = 1 << 28;

/// Adjusts one entry for vCPU `apic_id` of `cpus`.
fn fix_entry(e: &mut kvm_cpuid_entry2, apic_id: u8, cpus: u8) {
    match e.function {
        1 => {
            e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id as u32) << 24) | ((cpus as u32) << 16);
            e.ecx &= !(ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE | ECX_AVX);
            e.ecx |= ECX_HYPERVISOR;
            if cpus > 1 {
                e.edx |= EDX_HTT;
            }
        }
        // Extended topology: the x2APIC id of this vCPU.
        0xb | 0x1f => e.edx = apic_id as u32,
        // XSAVE state enumeration: nothing to advertise without XSAVE.
        0xd => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// Returns the CPUID for vCPU `apic_id` out of `cpus`, based on `supported`.
pub fn for_vcpu(supported: &CpuId, apic_id: u8, cpus: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        fix_entry(e, apic_id, cpus);
    }
    c
}

/// Guest physical address bits (leaf 0x80000008 EAX bits 7..0), or 36 if absent.
pub fn phys_bits(supported: &CpuId) -> u32 {
    supported
        .as_slice()
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|b| *b > 0)
        .unwrap_or(36)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let leaf1 = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0000_0800,
            ecx: ECX_CX16 | ECX_XSAVE | 1,
            edx: 1,
            ..Default::default()
        };
        let leafb = kvm_cpuid_entry2 {
            function: 0xb,
            ..Default::default()
        };
        let ext = kvm_cpuid_entry2 {
            function: 0x8000_0008,
            eax: 0x3028,
            ..Default::default()
        };
        CpuId::from_entries(&[leaf1, leafb, ext]).unwrap()
    }

    #[test]
    fn per_vcpu_ids_and_hidden_features() {
        let c = for_vcpu(&sample(), 3, 4);
        let l1 = c.as_slice()[0];
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_eq!(l1.ecx & ECX_CX16, 0, "cx16 must never be advertised");
        assert_eq!(l1.ecx & ECX_XSAVE, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[1].edx, 3);
        assert_eq!(phys_bits(&sample()), 0x28);
    }
}
