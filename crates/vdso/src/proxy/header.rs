//! The pristine copy a proxied restore leaves beside the runtime vDSO describes itself in a
//! header page, so the next dump recognises a proxy on every kernel (naming anonymous mappings
//! needs CONFIG_ANON_VMA_NAME, which not every kernel has) and never stacks a proxy on a proxy.

const PAGE: usize = 4096;

/// Names given (PR_SET_VMA_ANON_NAME, where the kernel has it) to what a proxy maps.
pub const PROXY_NAME: &str = "stasis-vdso-proxy";
pub const ORIGINAL_NAME: &str = "stasis-vdso-original";
pub const PLACEHOLDER_PREFIX: &str = "stasis-vvar-";

/// The pristine copy of a proxied vDSO starts with a page that describes the proxy, so the
/// next dump recognises it on every kernel (anonymous mapping names need CONFIG_ANON_VMA_NAME):
///
/// ```text
/// 0   magic  b"STASIS-VDSO-PRXY"              16
/// 16  proxy address, proxy length (u64 each)  16
/// 32  number of placeholders n (u64)           8
/// 40  n × { name [u8; 24] NUL-padded, start u64, end u64 }
/// 4096  the dumped vDSO's bytes, unpatched
/// ```
pub const PROXY_MAGIC: &[u8; 16] = b"STASIS-VDSO-PRXY";
/// As many as fit the header page (40 + 64 × 40 bytes < 4096); real kernels have one or two.
const MAX_PLACEHOLDERS: usize = 64;

/// The header page of the pristine copy.
pub fn proxy_header(proxy: (u64, u64), placeholders: &[(String, u64, u64)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(PAGE);
    h.extend_from_slice(PROXY_MAGIC);
    h.extend_from_slice(&proxy.0.to_le_bytes());
    h.extend_from_slice(&proxy.1.to_le_bytes());
    let placeholders = &placeholders[..placeholders.len().min(MAX_PLACEHOLDERS)];
    h.extend_from_slice(&(placeholders.len() as u64).to_le_bytes());
    for (name, s, e) in placeholders {
        let mut n = [0u8; 24];
        let b = name.as_bytes();
        n[..b.len().min(23)].copy_from_slice(&b[..b.len().min(23)]);
        h.extend_from_slice(&n);
        h.extend_from_slice(&s.to_le_bytes());
        h.extend_from_slice(&e.to_le_bytes());
    }
    h.resize(PAGE, 0);
    h
}

/// A vDSO-related area as (name, start, end).
pub type Area = (String, u64, u64);

/// Parses a header page into the proxy's (address, length) and its placeholders; None unless
/// it is one.
pub fn parse_proxy_header(h: &[u8]) -> Option<((u64, u64), Vec<Area>)> {
    let u = |o: usize| Some(u64::from_le_bytes(h.get(o..o + 8)?.try_into().ok()?));
    if h.get(..16)? != PROXY_MAGIC {
        return None;
    }
    let n = u(32)? as usize;
    if n > MAX_PLACEHOLDERS {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let o = 40 + i * 40;
        let raw = h.get(o..o + 24)?;
        let name =
            String::from_utf8(raw.iter().take_while(|&&c| c != 0).copied().collect()).ok()?;
        out.push((name, u(o + 24)?, u(o + 32)?));
    }
    Some(((u(16)?, u(24)?), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let ph = vec![
            ("[vvar]".to_string(), 0x7000, 0xb000),
            ("[vvar_vclock]".to_string(), 0xb000, 0xd000),
        ];
        let h = proxy_header((0xd000, 0x2000), &ph);
        assert_eq!(h.len(), PAGE);
        assert_eq!(parse_proxy_header(&h), Some(((0xd000, 0x2000), ph)));
    }

    #[test]
    fn long_names_are_cut_and_too_many_placeholders_kept_to_the_limit() {
        let long = "[vvar_with_a_name_longer_than_the_slot]".to_string();
        let many: Vec<Area> = (0..100).map(|i| (long.clone(), i, i + 1)).collect();
        let h = proxy_header((1, 2), &many);
        let (_, got) = parse_proxy_header(&h).expect("a header");
        assert_eq!(got.len(), MAX_PLACEHOLDERS);
        assert_eq!(got[0].0, long[..23]);
    }

    #[test]
    fn other_pages_are_not_headers() {
        assert_eq!(parse_proxy_header(&[0u8; PAGE]), None);
        assert_eq!(parse_proxy_header(&PROXY_MAGIC[..8]), None);
        let mut h = proxy_header((1, 2), &[]);
        h[32..40].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(parse_proxy_header(&h), None, "an implausible count");
        let mut h = proxy_header((1, 2), &[("[vvar]".into(), 3, 4)]);
        h[40] = 0xff;
        assert_eq!(parse_proxy_header(&h), None, "a name that is not UTF-8");
        assert_eq!(parse_proxy_header(&h[..50]), None, "a short page");
    }
}
