//! XSAVE areas across CPUs. The standard (non-compacted) format that ptrace's NT_X86_XSTATE
//! uses has a fixed legacy region (512 bytes: x87, SSE) and header (64 bytes: XSTATE_BV…), then
//! every extended component at an offset and size that CPUID leaf 0xD reports — and that
//! differ between CPUs (this AMD host puts 2432 bytes where the qemu guest CPU puts 2696, PKRU
//! elsewhere). Moving a thread between CPUs means moving each component to its new place.

/// Why an XSAVE area cannot be moved to this CPU.
#[derive(Debug, thiserror::Error)]
pub enum XsaveError {
    #[error("XSAVE area too short ({0} bytes)")]
    TooShort(usize),
    #[error("XSAVE component {0} is in use but this CPU does not have it")]
    Missing(u32),
    #[error("XSAVE component {i} is {size} bytes in the image, {here} here")]
    Size { i: u32, size: u32, here: u32 },
    #[error("XSAVE component {0} lies outside the dumped area")]
    OutsideSource(u32),
    #[error("XSAVE component {0} lies outside this CPU's area")]
    OutsideTarget(u32),
}

const LEGACY_AND_HEADER: usize = 512 + 64;
const XSTATE_BV: usize = 512;

/// (component, offset, size) of every extended component this CPU supports.
pub fn layout() -> Vec<(u32, u32, u32)> {
    let mut out = Vec::new();
    let supported = std::arch::x86_64::__cpuid_count(0xd, 0);
    let mask = ((supported.edx as u64) << 32) | supported.eax as u64;
    for i in 2..63u32 {
        if mask & (1 << i) == 0 {
            continue;
        }
        let leaf = std::arch::x86_64::__cpuid_count(0xd, i);
        if leaf.eax != 0 {
            out.push((i, leaf.ebx, leaf.eax));
        }
    }
    out
}

/// Rewrites `src` (laid out per `from`) for a CPU laid out per `to`, into `dst_len` bytes.
/// Components present in `src` (XSTATE_BV) must exist on the new CPU with the same size.
pub fn translate(
    src: &[u8],
    from: &[(u32, u32, u32)],
    to: &[(u32, u32, u32)],
    dst_len: usize,
) -> Result<Vec<u8>, XsaveError> {
    if src.len() < LEGACY_AND_HEADER || dst_len < LEGACY_AND_HEADER {
        return Err(XsaveError::TooShort(src.len()));
    }
    let mut dst = vec![0u8; dst_len];
    dst[..LEGACY_AND_HEADER].copy_from_slice(&src[..LEGACY_AND_HEADER]);
    let bv = u64::from_le_bytes(src[XSTATE_BV..XSTATE_BV + 8].try_into().unwrap_or([0; 8]));
    for &(i, off, size) in from {
        if bv & (1 << i) == 0 {
            continue;
        }
        let Some(&(_, new_off, new_size)) = to.iter().find(|c| c.0 == i) else {
            return Err(XsaveError::Missing(i));
        };
        if new_size != size {
            return Err(XsaveError::Size {
                i,
                size,
                here: new_size,
            });
        }
        let (off, new_off, size) = (off as usize, new_off as usize, size as usize);
        let Some(part) = src.get(off..off + size) else {
            return Err(XsaveError::OutsideSource(i));
        };
        let Some(slot) = dst.get_mut(new_off..new_off + size) else {
            return Err(XsaveError::OutsideTarget(i));
        };
        slot.copy_from_slice(part);
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_each_component_to_its_new_offset() {
        let from = [(2, 576, 256), (9, 2432 - 8, 8)];
        let to = [(2, 576, 256), (9, 2688, 8)];
        let mut src = vec![0u8; 2432];
        src[XSTATE_BV] = 0b1000_0111; // x87, SSE, AVX
        src[XSTATE_BV + 1] = 0b10; // PKRU (bit 9)
        src[576..576 + 256].fill(0xab);
        src[2424..2432].copy_from_slice(&0x5555_5555u64.to_le_bytes());
        src[100] = 7;
        let dst = translate(&src, &from, &to, 2696).expect("translate");
        assert_eq!(dst.len(), 2696);
        assert_eq!(dst[100], 7, "legacy region copied");
        assert!(dst[576..576 + 256].iter().all(|&b| b == 0xab));
        assert_eq!(&dst[2688..2696], &0x5555_5555u64.to_le_bytes());
    }

    #[test]
    fn refuses_a_component_this_cpu_lacks() {
        let mut src = vec![0u8; 1024];
        src[XSTATE_BV] = 1 << 5;
        assert!(translate(&src, &[(5, 600, 64)], &[], 1024).is_err());
    }

    #[test]
    fn unused_components_do_not_matter() {
        let src = vec![0u8; 1024];
        assert!(translate(&src, &[(5, 600, 64)], &[], 1024).is_ok());
    }
}
