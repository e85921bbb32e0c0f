//! The network lock for TCP connections that are dumped: an nftables table of stasis's own
//! that drops every packet of those connections, in both directions, while their sockets are
//! away — so neither end sees a reset, and the peer's packets are simply lost and sent again
//! once the restored socket is back. It is the one place stasis runs another program (`nft`,
//! from the nftables package): the kernel's nftables interface is a netlink protocol that
//! `nft` speaks for us.
//!
//! The table is named after the dump (`stasis_<pid>_<nonce>`); the image records the name so
//! that the restore, once the connections are back, deletes it (`unlock`).

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

/// One connection: (local address, local port), (remote address, remote port).
pub type Tuple = ((IpAddr, u16), (IpAddr, u16));

/// Where `nft` is, if anywhere.
pub fn nft_path() -> Option<std::path::PathBuf> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft", "/bin/nft"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
}

fn run_nft(script: &str) -> Result<(), String> {
    let nft = nft_path().ok_or_else(|| {
        "nft (the nftables package) is not installed: it is needed to lock TCP connections"
            .to_string()
    })?;
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The family word and the address as nft writes them (an IPv4-mapped IPv6 address is IPv4
/// on the wire).
fn addr(ip: IpAddr) -> (&'static str, String) {
    match ip {
        IpAddr::V4(v4) => ("ip", v4.to_string()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ("ip", v4.to_string()),
            None => ("ip6", v6.to_string()),
        },
    }
}

/// The rules that drop one connection's packets, both ways, on the way in and out.
fn rules(table: &str, t: &Tuple) -> String {
    let ((l, lp), (r, rp)) = *t;
    let ((fam, l), (_, r)) = (addr(l), addr(r));
    let mut s = String::new();
    for chain in ["input", "output"] {
        for (src, sp, dst, dp) in [(&r, rp, &l, lp), (&l, lp, &r, rp)] {
            s.push_str(&format!(
                "add rule inet {table} {chain} {fam} saddr {src} tcp sport {sp} {fam} daddr {dst} tcp dport {dp} drop\n"
            ));
        }
    }
    s
}

/// Makes the table (if `create`) and adds the rules for `tuples`.
pub fn lock(table: &str, create: bool, tuples: &[Tuple]) -> Result<(), String> {
    let mut script = String::new();
    if create {
        script.push_str(&format!("add table inet {table}\n"));
        for (chain, hook) in [("input", "input"), ("output", "output")] {
            script.push_str(&format!(
                "add chain inet {table} {chain} {{ type filter hook {hook} priority -300; policy accept; }}\n"
            ));
        }
    }
    for t in tuples {
        script.push_str(&rules(table, t));
    }
    run_nft(&script)
}

/// Deletes the table: every connection it held is let through again.
pub fn unlock(table: &str) -> Result<(), String> {
    if !valid_name(table) {
        return Err(format!(
            "{table:?} is not the name of a stasis network lock"
        ));
    }
    run_nft(&format!("delete table inet {table}\n"))
}

/// Whether the table exists.
pub fn exists(table: &str) -> bool {
    let Some(nft) = nft_path() else { return false };
    valid_name(table)
        && Command::new(nft)
            .args(["list", "table", "inet", table])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A name stasis makes (`stasis_` and digits and underscores): an image cannot make the
/// restore delete any other table.
pub fn valid_name(table: &str) -> bool {
    table.strip_prefix("stasis_").is_some_and(|rest| {
        !rest.is_empty() && rest.len() < 48 && rest.bytes().all(|c| c.is_ascii_digit() || c == b'_')
    })
}

/// A fresh table name for a dump of `pid`.
pub fn new_name(pid: i32) -> String {
    let nonce = crate::clock_ns(libc::CLOCK_REALTIME) % 1_000_000_000;
    format!("stasis_{pid}_{nonce}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_drop_both_directions_and_mapped_addresses_are_ipv4() {
        let t: Tuple = (
            ("::ffff:127.0.0.1".parse().expect("ip"), 80),
            ("::ffff:10.0.0.2".parse().expect("ip"), 5000),
        );
        let r = rules("stasis_1_2", &t);
        assert!(r.contains(
            "input ip saddr 10.0.0.2 tcp sport 5000 ip daddr 127.0.0.1 tcp dport 80 drop"
        ));
        assert!(r.contains(
            "output ip saddr 127.0.0.1 tcp sport 80 ip daddr 10.0.0.2 tcp dport 5000 drop"
        ));
        assert_eq!(r.lines().count(), 4);
        assert!(valid_name(&new_name(42)));
        assert!(!valid_name("filter"));
        assert!(!valid_name("stasis_1; flush ruleset"));
    }
}
