//! Which vDSO-related special mappings a process has, as /proc/PID/maps shows them.
//!
//! Kernels differ in how many `[vvar…]` areas they map, in what order and of what size (6.1:
//! `[vvar]` 4 pages + `[vdso]` 2; 6.13: `[vvar]` 2 + `[vvar_vclock]` 2 + `[vdso]` 2; 6.15+:
//! `[vvar]` 4 + `[vvar_vclock]` 2 + `[vdso]` 2). Nothing here assumes any of that: a layout is
//! exactly the areas maps lists, in maps order, selected by the one shared name rule
//! `stasis_abi::is_vdso_area_name`, so a future `[vvar_something]` is picked up unchanged.

use serde::Serialize;
use stasis_proc::Vma;

use crate::VdsoError;

/// One vDSO-related special mapping: `[vdso]` or any `[vvar…]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VdsoArea {
    /// The name maps gives it, brackets included (`[vvar_vclock]`).
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: u32,
}

impl VdsoArea {
    pub fn size(&self) -> u64 {
        // `end >= start` holds for areas built from `Vma`s (parse_maps rejects the rest); the
        // saturation only keeps a hand-built bogus area from panicking.
        self.end.saturating_sub(self.start)
    }

    /// The code mapping, the only one that is an ELF image.
    pub fn is_vdso(&self) -> bool {
        self.name == VDSO_NAME
    }

    /// A kernel data mapping the vDSO code reads at a fixed distance; its contents are
    /// per-kernel and are never dumped.
    pub fn is_vvar(&self) -> bool {
        !self.is_vdso() && stasis_abi::is_vdso_area_name(self.name.as_bytes())
    }
}

impl From<&Vma> for VdsoArea {
    fn from(v: &Vma) -> Self {
        VdsoArea {
            name: v.name_lossy().into_owned(),
            start: v.start,
            end: v.end,
            prot: v.prot,
        }
    }
}

pub(crate) const VDSO_NAME: &str = "[vdso]";

/// Every vDSO-related special mapping of a process, in /proc/PID/maps order (any count, order,
/// size: never hard-code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VdsoLayout {
    pub areas: Vec<VdsoArea>,
}

impl VdsoLayout {
    /// Keeps the VMAs whose name passes `is_vdso_area_name`, in the order given.
    pub fn from_vmas(vmas: &[Vma]) -> VdsoLayout {
        let areas = vmas
            .iter()
            .filter(|v| stasis_abi::is_vdso_area_name(&v.name))
            .map(VdsoArea::from)
            .collect();
        VdsoLayout { areas }
    }

    /// The layout of a live process, from its /proc/PID/maps.
    pub fn of_pid(pid: i32) -> Result<VdsoLayout, VdsoError> {
        let vmas = stasis_proc::maps(pid).map_err(|source| VdsoError::Maps { pid, source })?;
        Ok(Self::from_vmas(&vmas))
    }

    /// The `[vdso]` area; the first one if a process somehow has several (maps order).
    pub fn vdso(&self) -> Option<&VdsoArea> {
        self.areas.iter().find(|a| a.is_vdso())
    }

    /// Every `[vvar…]` area, in maps order.
    pub fn vvars(&self) -> impl Iterator<Item = &VdsoArea> {
        self.areas.iter().filter(|a| a.is_vvar())
    }

    /// True when the process has no vDSO-related mapping at all (never had one, or unmapped it).
    pub fn is_empty(&self) -> bool {
        self.areas.is_empty()
    }

    /// Lowest start and highest end over all areas. The areas are adjacent on every kernel seen
    /// so far, but this does not assume it: moving the set whole needs the full extent.
    pub fn span(&self) -> Option<(u64, u64)> {
        let start = self.areas.iter().map(|a| a.start).min()?;
        let end = self.areas.iter().map(|a| a.end).max()?;
        Some((start, end))
    }

    /// Human description like `"[vvar] 16K, [vvar_vclock] 8K, [vdso] 8K"`; `"none"` when empty.
    pub fn describe(&self) -> String {
        if self.areas.is_empty() {
            return "none".to_string();
        }
        self.areas
            .iter()
            .map(|a| format!("{} {}", a.name, human_size(a.size())))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `16K` for whole KiB (every page-sized area), exact bytes otherwise so nothing is rounded away.
pub fn human_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1024) {
        format!("{}K", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_proc::parse_maps;

    fn layout(maps: &str) -> VdsoLayout {
        VdsoLayout::from_vmas(&parse_maps(maps.as_bytes()).expect("test maps text parses"))
    }

    fn names(l: &VdsoLayout) -> Vec<&str> {
        l.areas.iter().map(|a| a.name.as_str()).collect()
    }

    /// 6.1 and 6.12: `[vvar]` 4 pages then `[vdso]` 2 (here just above the stack).
    #[test]
    fn layout_6_1() {
        let l = layout(
            "55d4a0000000-55d4a0001000 r--p 00000000 fd:01 42   /usr/bin/sleep\n\
             7ffc0d5e0000-7ffc0d601000 rw-p 00000000 00:00 0    [stack]\n\
             7ffc0d7f0000-7ffc0d7f4000 r--p 00000000 00:00 0    [vvar]\n\
             7ffc0d7f4000-7ffc0d7f6000 r-xp 00000000 00:00 0    [vdso]\n\
             ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]\n",
        );
        assert_eq!(names(&l), ["[vvar]", "[vdso]"]);
        assert_eq!(l.describe(), "[vvar] 16K, [vdso] 8K");
        let vdso = l.vdso().expect("[vdso] present");
        assert_eq!((vdso.start, vdso.size()), (0x7ffc0d7f4000, 0x2000));
        assert_eq!(vdso.prot, stasis_proc::PROT_READ | stasis_proc::PROT_EXEC);
        assert_eq!(
            l.vvars().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["[vvar]"]
        );
        assert_eq!(l.span(), Some((0x7ffc0d7f0000, 0x7ffc0d7f6000)));
        assert!(!l.is_empty());
    }

    /// 6.13–6.14: `[vvar]` 2, `[vvar_vclock]` 2, `[vdso]` 2, in the mmap area.
    #[test]
    fn layout_6_13() {
        let l = layout(
            "7f3a1c000000-7f3a1c002000 r--p 00000000 00:00 0 [vvar]\n\
             7f3a1c002000-7f3a1c004000 r--p 00000000 00:00 0 [vvar_vclock]\n\
             7f3a1c004000-7f3a1c006000 r-xp 00000000 00:00 0 [vdso]\n\
             7f3a1c006000-7f3a1c008000 r--p 00000000 fd:01 7 /usr/lib/ld-linux-x86-64.so.2\n",
        );
        assert_eq!(names(&l), ["[vvar]", "[vvar_vclock]", "[vdso]"]);
        assert_eq!(l.describe(), "[vvar] 8K, [vvar_vclock] 8K, [vdso] 8K");
        assert_eq!(l.vvars().count(), 2);
        assert_eq!(l.vdso().map(|a| a.start), Some(0x7f3a1c004000));
    }

    /// A process that unmapped its vDSO (or was started without one).
    #[test]
    fn layout_without_vdso() {
        let l = layout(
            "00400000-00401000 r-xp 00000000 fd:01 9 /bin/true\n\
             7ffc0d5e0000-7ffc0d601000 rw-p 00000000 00:00 0 [stack]\n",
        );
        assert!(l.is_empty());
        assert!(l.vdso().is_none());
        assert_eq!(l.vvars().count(), 0);
        assert_eq!(l.span(), None);
        assert_eq!(l.describe(), "none");
    }

    /// A future kernel adding another vvar area, placed after `[vdso]`, with an odd size:
    /// everything is read, nothing assumed.
    #[test]
    fn layout_future_vvar_area() {
        let l = layout(
            "7f0000000000-7f0000004000 r--p 00000000 00:00 0 [vvar]\n\
             7f0000004000-7f0000006000 r-xp 00000000 00:00 0 [vdso]\n\
             7f0000006000-7f0000009000 r--p 00000000 00:00 0 [vvar_foo]\n\
             7f0000009000-7f000000a000 rw-p 00000000 00:00 0 [vvarish\n",
        );
        assert_eq!(names(&l), ["[vvar]", "[vdso]", "[vvar_foo]"]);
        assert_eq!(l.describe(), "[vvar] 16K, [vdso] 8K, [vvar_foo] 12K");
        assert_eq!(
            l.vvars().map(|a| a.name.as_str()).collect::<Vec<_>>(),
            ["[vvar]", "[vvar_foo]"]
        );
        assert_eq!(l.span(), Some((0x7f0000000000, 0x7f0000009000)));
    }

    /// Only vvar areas left (the process unmapped `[vdso]` alone): not empty, but no image.
    #[test]
    fn layout_vvar_without_vdso() {
        let l = layout("7f0000000000-7f0000004000 r--p 00000000 00:00 0 [vvar]\n");
        assert!(!l.is_empty());
        assert!(l.vdso().is_none());
    }

    #[test]
    fn describe_keeps_odd_sizes_exact() {
        let l = VdsoLayout {
            areas: vec![VdsoArea {
                name: "[vdso]".into(),
                start: 0x1000,
                end: 0x1a00,
                prot: 5,
            }],
        };
        assert_eq!(l.describe(), "[vdso] 2560B");
    }
}
