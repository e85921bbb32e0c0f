//! The decision and the proxy image on the real vDSOs of four kernels and this host, plus
//! corrupted copies. Every built image is checked independently of the builder: its patches are
//! decoded again with iced, compared byte for byte with the old image, and its symbols re-read.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, OpKind, Register};

use super::*;
use crate::VdsoLayout;

const OLD_BASE: u64 = 0x7f00_0000_0000;
/// Runtime vDSO placements: near above, near below (rel32 reaches), 8 GiB above (it does not).
const NEAR_ABOVE: u64 = OLD_BASE + 0x8000;
const NEAR_BELOW: u64 = OLD_BASE - 0x10000;
const FAR: u64 = OLD_BASE + 0x2_0000_0000;

struct Kernel {
    tag: &'static str,
    image: &'static [u8],
    areas: Vec<(String, u64)>,
}

macro_rules! testdata {
    ($file:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/", $file))
    };
}
macro_rules! testdata_str {
    ($file:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/", $file))
    };
}

fn areas_from_maps(text: &str) -> Vec<(String, u64)> {
    let vmas = stasis_proc::parse_maps(text.as_bytes()).expect("testdata maps parse");
    VdsoLayout::from_vmas(&vmas)
        .areas
        .iter()
        .map(|a| (a.name.clone(), a.size()))
        .collect()
}

fn areas(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|&(n, s)| (n.to_string(), s)).collect()
}

/// The five images in kernel order. The host image has no `.maps`; its layout is the one
/// testdata/README.md records for it.
fn kernels() -> Vec<Kernel> {
    vec![
        Kernel {
            tag: "6.1",
            image: testdata!("vdso-6.1.so"),
            areas: areas_from_maps(testdata_str!("vdso-6.1.maps")),
        },
        Kernel {
            tag: "6.12",
            image: testdata!("vdso-6.12.so"),
            areas: areas_from_maps(testdata_str!("vdso-6.12.maps")),
        },
        Kernel {
            tag: "6.18",
            image: testdata!("vdso-6.18.so"),
            areas: areas_from_maps(testdata_str!("vdso-6.18.maps")),
        },
        Kernel {
            tag: "6.18-host",
            image: testdata!("vdso-6.18-host.so"),
            areas: areas(&[
                ("[vvar]", 0x4000),
                ("[vvar_vclock]", 0x2000),
                ("[vdso]", 0x2000),
            ]),
        },
        Kernel {
            tag: "7.3",
            image: testdata!("vdso-7.3.so"),
            areas: areas_from_maps(testdata_str!("vdso-7.3.maps")),
        },
    ]
}

fn kernel(tag: &str) -> Kernel {
    kernels()
        .into_iter()
        .find(|k| k.tag == tag)
        .expect("known kernel tag")
}

fn syms(image: &[u8]) -> Vec<VdsoSymbol> {
    symbols_from_image(image).expect("testdata image parses")
}

fn decide_between(image: &Kernel, runtime: &Kernel) -> Strategy {
    decide(
        &image.areas,
        &syms(image.image),
        &runtime.areas,
        &syms(runtime.image),
    )
}

fn reasons(strategy: Strategy) -> Vec<String> {
    match strategy {
        Strategy::Proxy { reasons } => reasons,
        Strategy::Remap => panic!("expected Proxy, got Remap"),
    }
}

fn assert_mentions(reasons: &[String], needle: &str) {
    assert!(
        reasons.iter().any(|r| r.contains(needle)),
        "no reason mentions {needle:?}: {reasons:#?}"
    );
}

// ---------------------------------------------------------------- decide

#[test]
fn testdata_layouts_are_as_documented() {
    let described: Vec<String> = kernels()
        .iter()
        .map(|k| {
            k.areas
                .iter()
                .map(|(n, s)| format!("{n} {}", human_size(*s)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    assert_eq!(
        described,
        [
            "[vvar] 16K, [vdso] 8K",
            "[vvar] 16K, [vdso] 8K",
            "[vvar] 16K, [vvar_vclock] 8K, [vdso] 8K",
            "[vvar] 16K, [vvar_vclock] 8K, [vdso] 8K",
            "[vvar] 16K, [vvar_vclock] 8K, [vdso] 8K",
        ]
    );
}

#[test]
fn same_kernel_is_remap() {
    let host = kernel("6.18-host");
    assert_eq!(decide_between(&host, &host), Strategy::Remap);
}

#[test]
fn decision_matrix_is_remap_only_on_the_diagonal() {
    let ks = kernels();
    println!(
        "image \\ runtime: {:?}",
        ks.iter().map(|k| k.tag).collect::<Vec<_>>()
    );
    for a in &ks {
        let row: Vec<&str> = ks
            .iter()
            .map(|b| match decide_between(a, b) {
                Strategy::Remap => "Remap",
                Strategy::Proxy { .. } => "Proxy",
            })
            .collect();
        println!("{:>10}: {row:?}", a.tag);
        for (b, cell) in ks.iter().zip(&row) {
            let expected = if a.tag == b.tag { "Remap" } else { "Proxy" };
            assert_eq!(*cell, expected, "{} -> {}", a.tag, b.tag);
        }
    }
}

#[test]
fn from_6_1_to_6_18_names_the_new_area_and_moved_functions() {
    let r = reasons(decide_between(&kernel("6.1"), &kernel("6.18")));
    println!("{r:#?}");
    assert_eq!(r[0], "[vvar_vclock] 8K exists on this kernel only");
    assert_mentions(&r, "__vdso_getrandom/getrandom exists on this kernel only");
    assert_mentions(
        &r,
        "__vdso_clock_gettime/clock_gettime at +0x960 in the image, +0xb80 here",
    );
    // 1 area + 1 new + 6 moved functions.
    assert_eq!(r.len(), MAX_REASONS + 1);
    assert_eq!(r[MAX_REASONS], "and 3 more");
}

#[test]
fn two_builds_of_6_18_differ_in_offsets_and_sgx() {
    let r = reasons(decide_between(&kernel("6.18"), &kernel("6.18-host")));
    println!("{r:#?}");
    assert_eq!(r[0], "__vdso_sgx_enter_enclave missing here");
    assert_mentions(
        &r,
        "__vdso_clock_gettime/clock_gettime at +0xb80 in the image, +0xaf0 here",
    );
    assert!(!r.iter().any(|r| r.contains("vvar")), "{r:#?}");
}

#[test]
fn from_7_3_to_6_12_names_the_futex_functions() {
    let r = reasons(decide_between(&kernel("7.3"), &kernel("6.12")));
    println!("{r:#?}");
    assert_eq!(r[0], "[vvar_vclock] 8K exists in the image only");
    assert_mentions(&r, "__vdso_futex_robust_list64_try_unlock missing here");
    assert_mentions(&r, "__vdso_futex_robust_list32_try_unlock missing here");
}

fn sym(name: &str, version: &str, offset: u64) -> VdsoSymbol {
    VdsoSymbol {
        name: name.to_string(),
        version: version.to_string(),
        offset,
        size: 16,
        info: 0x12,
    }
}

#[test]
fn area_size_and_order_differences_are_named() {
    let s = [sym("__vdso_time", "LINUX_2.6", 0x900)];
    let image = areas(&[("[vvar]", 0x4000), ("[vdso]", 0x2000)]);
    let bigger = areas(&[("[vvar]", 0x4000), ("[vdso]", 0x3000)]);
    assert_eq!(
        reasons(decide(&image, &s, &bigger, &s)),
        ["[vdso] 8K in the image, 12K here"]
    );
    let swapped = areas(&[("[vdso]", 0x2000), ("[vvar]", 0x4000)]);
    assert_eq!(
        reasons(decide(&image, &s, &swapped, &s)),
        ["area order [vvar] [vdso] in the image, [vdso] [vvar] here"]
    );
    assert_eq!(decide(&image, &s, &image, &s), Strategy::Remap);
}

#[test]
fn version_and_new_symbol_differences_are_named() {
    let a = areas(&[("[vdso]", 0x2000)]);
    let image = [sym("__vdso_time", "LINUX_2.6", 0x900)];
    let runtime = [
        sym("__vdso_time", "LINUX_2.7", 0x900),
        sym("__vdso_new", "LINUX_2.6", 0xa00),
    ];
    assert_eq!(
        reasons(decide(&a, &image, &a, &runtime)),
        [
            "__vdso_new exists on this kernel only",
            "__vdso_time has version \"LINUX_2.6\" in the image, \"LINUX_2.7\" here",
        ]
    );
}

#[test]
fn more_than_five_reasons_are_summarised() {
    let a = areas(&[("[vdso]", 0x2000)]);
    let image: Vec<VdsoSymbol> = (0..8)
        .map(|i| sym(&format!("f{i}"), "V", 0x100 * i))
        .collect();
    let r = reasons(decide(&a, &image, &a, &[]));
    assert_eq!(r.len(), MAX_REASONS + 1);
    assert_eq!(r[0], "f0 missing here");
    assert_eq!(r[MAX_REASONS], "and 3 more");
}

// ---------------------------------------------------------------- build_proxy

/// The bytes a patch of `kind` at `ip` must decode to, checked instruction by instruction.
fn assert_patch_code(patched: &[u8], ip: u64, kind: &PatchKind, far: bool, what: &str) {
    let mut decoder = Decoder::with_ip(64, patched, ip, DecoderOptions::NONE);
    let code: Vec<Instruction> = decoder.iter().collect();
    let n = match *kind {
        PatchKind::Jump { target } if far => {
            assert_eq!(code[0].code(), Code::Mov_r64_imm64, "{what}");
            assert_eq!(code[0].op0_register(), Register::RAX, "{what}");
            assert_eq!(code[0].immediate64(), target, "{what}");
            assert_eq!(code[1].code(), Code::Jmp_rm64, "{what}");
            assert_eq!(code[1].op0_kind(), OpKind::Register, "{what}");
            assert_eq!(code[1].op0_register(), Register::RAX, "{what}");
            2
        }
        PatchKind::Jump { target } => {
            assert_eq!(code[0].code(), Code::Jmp_rel32_64, "{what}");
            assert_eq!(code[0].near_branch_target(), target, "{what}");
            1
        }
        PatchKind::Syscall { nr } => {
            assert_eq!(code[0].code(), Code::Mov_r32_imm32, "{what}");
            assert_eq!(code[0].op0_register(), Register::EAX, "{what}");
            assert_eq!(code[0].immediate32(), nr, "{what}");
            assert_eq!(code[1].code(), Code::Syscall, "{what}");
            assert_eq!(code[2].code(), Code::Retnq, "{what}");
            3
        }
        PatchKind::Enosys => {
            assert_eq!(code[0].code(), Code::Mov_rm64_imm32, "{what}");
            assert_eq!(code[0].op0_register(), Register::RAX, "{what}");
            assert_eq!(code[0].immediate32to64(), -38, "{what}");
            assert_eq!(code[1].code(), Code::Retnq, "{what}");
            2
        }
        PatchKind::Untouched => panic!("{what}: an untouched function has no patch bytes"),
    };
    for i in &code[n..] {
        assert_eq!(i.code(), Code::Int3, "{what}: fill after the patch");
    }
}

/// True when the old code decoded from `offset` has an instruction ending exactly at `end`.
fn is_instruction_boundary(image: &[u8], offset: u64, end: u64) -> bool {
    let bytes = &image[offset as usize..end as usize];
    let mut decoder = Decoder::new(64, bytes, DecoderOptions::NONE);
    decoder.iter().all(|i| !i.is_invalid()) && decoder.position() == bytes.len()
}

/// Checks everything `build_proxy` promises about `build`, independently of how it was built.
/// `far`: the runtime is out of rel32 reach.
fn check_build(
    old: &[u8],
    runtime: &[VdsoSymbol],
    runtime_base: u64,
    build: &ProxyBuild,
    far: bool,
) {
    let old_syms = syms(old);
    assert_eq!(build.image.len(), old.len());
    assert_eq!(syms(&build.image), old_syms, "exported symbols changed");
    let code = Segments::parse(old)
        .expect("old image parses")
        .code_ranges(old.len());

    let mut offsets: Vec<u64> = old_syms
        .iter()
        .filter(|s| s.is_function())
        .map(|s| s.offset)
        .collect();
    offsets.sort();
    offsets.dedup();
    let patched: Vec<u64> = build.patches.iter().map(|p| p.offset).collect();
    assert_eq!(
        patched, offsets,
        "every function offset patched once, in order"
    );

    let mut changed = vec![false; old.len()];
    for p in &build.patches {
        let at = old_syms.iter().filter(|s| s.offset == p.offset);
        let names: Vec<&str> = at.clone().map(|s| s.name.as_str()).collect();
        assert_eq!(p.names, names, "+{:#x}", p.offset);
        let what = format!("{} at +{:#x}", names.join("/"), p.offset);

        let counterpart = at.clone().find_map(|s| {
            runtime
                .iter()
                .find(|r| r.name == s.name && r.version == s.version)
        });
        match (counterpart, &p.kind) {
            (Some(r), kind) => assert_eq!(
                *kind,
                PatchKind::Jump {
                    target: runtime_base + r.offset
                },
                "{what}"
            ),
            (None, PatchKind::Jump { .. }) => panic!("{what}: jump without a counterpart"),
            (None, _) => assert!(
                build
                    .notes
                    .iter()
                    .any(|n| n.starts_with(&p.names.join("/"))),
                "{what}: no note: {:#?}",
                build.notes
            ),
        }
        if p.kind == PatchKind::Untouched {
            assert_eq!(p.len, 0, "{what}");
            continue;
        }

        let end = p.offset + p.len;
        assert!(
            code.iter().any(|r| r.start <= p.offset && end <= r.end),
            "{what}: patch outside code"
        );
        let size = at.clone().map(|s| s.size).filter(|&s| s > 0).min();
        if let Some(size) = size {
            assert!(p.len <= size, "{what}: {} bytes > st_size {size}", p.len);
        }
        assert!(
            !old_syms
                .iter()
                .any(|s| s.offset > p.offset && s.offset < end),
            "{what}: covers another symbol's entry"
        );
        assert!(
            is_instruction_boundary(old, p.offset, end),
            "{what}: patch ends inside an old instruction"
        );
        let ip = OLD_BASE + p.offset;
        assert_patch_code(
            &build.image[p.offset as usize..end as usize],
            ip,
            &p.kind,
            far,
            &what,
        );
        changed[p.offset as usize..end as usize].fill(true);
    }
    for (i, (&a, &b)) in old.iter().zip(&build.image).enumerate() {
        if !changed[i] {
            assert_eq!(a, b, "byte +{i:#x} outside every patch changed");
        }
    }
}

fn build(old: &[u8], runtime: &[u8], runtime_base: u64) -> ProxyBuild {
    build_proxy(old, OLD_BASE, &syms(runtime), runtime_base).expect("proxy builds")
}

fn kinds(build: &ProxyBuild) -> Vec<(String, PatchKind)> {
    build
        .patches
        .iter()
        .map(|p| (p.names.join("/"), p.kind.clone()))
        .collect()
}

fn kind_of<'a>(build: &'a ProxyBuild, name: &str) -> &'a PatchKind {
    &build
        .patches
        .iter()
        .find(|p| p.names.iter().any(|n| n == name))
        .unwrap_or_else(|| panic!("no patch for {name}"))
        .kind
}

#[test]
fn every_pair_builds_a_checked_proxy_near_and_far() {
    for a in kernels() {
        for b in kernels() {
            let runtime = syms(b.image);
            for (base, far) in [(NEAR_ABOVE, false), (NEAR_BELOW, false), (FAR, true)] {
                let built = build(a.image, b.image, base);
                check_build(a.image, &runtime, base, &built, far);
                if base == NEAR_ABOVE {
                    let lens: Vec<u64> = built.patches.iter().map(|p| p.len).collect();
                    println!("{} -> {}: patch lengths {lens:?}", a.tag, b.tag);
                    for n in &built.notes {
                        println!("    {n}");
                    }
                }
            }
        }
    }
}

#[test]
fn from_7_3_to_6_1_stubs_getrandom_and_keeps_the_futex_functions() {
    let (old, runtime) = (kernel("7.3"), kernel("6.1"));
    let built = build(old.image, runtime.image, NEAR_ABOVE);
    println!("{:#?}\n{:#?}", kinds(&built), built.notes);
    assert_eq!(
        *kind_of(&built, "__vdso_getrandom"),
        PatchKind::Syscall { nr: 318 }
    );
    for f in [
        "__vdso_futex_robust_list64_try_unlock",
        "__vdso_futex_robust_list32_try_unlock",
    ] {
        assert_eq!(*kind_of(&built, f), PatchKind::Untouched, "{f}");
        assert!(built.notes.iter().any(|n| n.contains(f)), "{f} not noted");
    }
    assert!(matches!(
        kind_of(&built, "__vdso_sgx_enter_enclave"),
        PatchKind::Jump { .. }
    ));
    assert!(built.notes.iter().any(|n| n.contains("getrandom")));
    assert_eq!(built.notes.len(), 3, "{:#?}", built.notes);
    let jumps = built
        .patches
        .iter()
        .filter(|p| matches!(p.kind, PatchKind::Jump { .. }))
        .count();
    assert_eq!(
        jumps, 6,
        "time, gettimeofday, clock_gettime, clock_getres, getcpu, sgx"
    );
}

/// The analysis agrees with a plain reading of the code: the futex functions have no memory
/// operand relative to rip, getrandom has one below the image (vvar).
#[test]
fn vvar_references_seen_by_a_plain_decode() {
    let image = kernel("7.3").image;
    let rip_relative = |name: &str| -> Vec<i64> {
        let s = syms(image)
            .into_iter()
            .find(|s| s.name == name)
            .expect(name);
        let bytes = &image[s.offset as usize..(s.offset + s.size) as usize];
        let mut decoder = Decoder::with_ip(64, bytes, OLD_BASE + s.offset, DecoderOptions::NONE);
        decoder
            .iter()
            .filter(|i| i.is_ip_rel_memory_operand())
            .map(|i| i.ip_rel_memory_address().wrapping_sub(OLD_BASE) as i64)
            .collect()
    };
    assert_eq!(rip_relative("__vdso_futex_robust_list64_try_unlock"), []);
    assert_eq!(rip_relative("__vdso_futex_robust_list32_try_unlock"), []);
    assert!(rip_relative("__vdso_getrandom").iter().any(|&o| o < 0));
}

#[test]
fn from_6_1_to_7_3_jumps_everywhere() {
    let built = build(kernel("6.1").image, kernel("7.3").image, NEAR_ABOVE);
    println!("{:#?}", kinds(&built));
    assert!(built.notes.is_empty(), "{:#?}", built.notes);
    assert!(built
        .patches
        .iter()
        .all(|p| matches!(p.kind, PatchKind::Jump { .. })));
    assert_eq!(
        *kind_of(&built, "clock_gettime"),
        PatchKind::Jump {
            target: NEAR_ABOVE + 0xcb0
        }
    );
}

#[test]
fn to_the_host_sgx_stays_and_to_6_1_getrandom_is_a_syscall() {
    let to_host = build(kernel("7.3").image, kernel("6.18-host").image, FAR);
    assert_eq!(
        *kind_of(&to_host, "__vdso_sgx_enter_enclave"),
        PatchKind::Untouched
    );
    let host_to_6_1 = build(kernel("6.18-host").image, kernel("6.1").image, FAR);
    assert_eq!(
        *kind_of(&host_to_6_1, "getrandom"),
        PatchKind::Syscall { nr: 318 }
    );
}

/// With no runtime symbols at all, every function reading vvar becomes its syscall.
#[test]
fn without_runtime_symbols_known_functions_become_syscalls() {
    let old = kernel("6.12").image;
    let built = build_proxy(old, OLD_BASE, &[], FAR).expect("proxy builds");
    check_build(old, &[], FAR, &built, true);
    let expect = [
        ("__vdso_gettimeofday", 96),
        ("__vdso_time", 201),
        ("__vdso_clock_gettime", 228),
        ("__vdso_clock_getres", 229),
        ("__vdso_getrandom", 318),
    ];
    for (name, nr) in expect {
        assert_eq!(*kind_of(&built, name), PatchKind::Syscall { nr }, "{name}");
    }
    // rdpid/lsl and ENCLU: no vvar.
    assert_eq!(*kind_of(&built, "__vdso_getcpu"), PatchKind::Untouched);
    assert_eq!(
        *kind_of(&built, "__vdso_sgx_enter_enclave"),
        PatchKind::Untouched
    );
}

// ---------------------------------------------------------------- crafted images

fn rd(image: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(image[off..off + 8].try_into().expect("8 bytes"))
}

/// Image offsets of the `Elf64_Sym` entries with this value and size (aliases give several).
fn sym_entries(image: &[u8], value: u64, size: u64) -> Vec<usize> {
    (0..image.len() - 24)
        .step_by(8)
        .filter(|&p| {
            rd(image, p + 8) == value && rd(image, p + 16) == size && image[p + 4] & 0xf == 2
        })
        .collect()
}

fn set_sym(image: &mut [u8], value: u64, size: u64, new_value: u64, new_size: u64) {
    let entries = sym_entries(image, value, size);
    assert!(!entries.is_empty(), "no symbol {value:#x}/{size}");
    for p in entries {
        image[p + 8..p + 16].copy_from_slice(&new_value.to_le_bytes());
        image[p + 16..p + 24].copy_from_slice(&new_size.to_le_bytes());
    }
}

#[test]
fn unknown_function_reading_vvar_returns_enosys() {
    // Rename getrandom (its two names share one string) to a name no kernel has.
    let mut old = kernel("7.3").image.to_vec();
    let at = old
        .windows(10)
        .position(|w| w == b"getrandom\0")
        .expect("name in dynstr");
    old[at + 8] = b'X';
    let runtime = syms(kernel("6.12").image);
    let built = build_proxy(&old, OLD_BASE, &runtime, NEAR_ABOVE).expect("proxy builds");
    check_build(&old, &runtime, NEAR_ABOVE, &built, false);
    assert_eq!(*kind_of(&built, "__vdso_getrandoX"), PatchKind::Enosys);
    assert!(built
        .notes
        .iter()
        .any(|n| n.contains("getrandoX") && n.contains("ENOSYS")));
}

#[test]
fn unknown_size_is_bounded_by_the_next_symbol_and_the_code_end() {
    let mut old = kernel("7.3").image.to_vec();
    set_sym(&mut old, 0x1670, 15, 0x1670, 0);
    set_sym(&mut old, 0x1680, 14, 0x1680, 0);
    let same = syms(kernel("7.3").image);
    for (base, far) in [(NEAR_ABOVE, false), (FAR, true)] {
        let built = build_proxy(&old, OLD_BASE, &same, base).expect("proxy builds");
        check_build(&old, &same, base, &built, far);
    }
    // Without a counterpart the flow walk (up to `ret`) still finds no vvar access.
    let built = build_proxy(&old, OLD_BASE, &syms(kernel("6.1").image), FAR).expect("builds");
    assert_eq!(
        *kind_of(&built, "__vdso_futex_robust_list64_try_unlock"),
        PatchKind::Untouched
    );
}

#[test]
fn next_symbol_too_close_for_an_unsized_function_is_an_error() {
    let mut old = kernel("7.3").image.to_vec();
    set_sym(&mut old, 0x1670, 15, 0x1670, 0);
    set_sym(&mut old, 0x1680, 14, 0x1673, 0);
    let err = build_proxy(&old, OLD_BASE, &syms(kernel("7.3").image), NEAR_ABOVE).unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, VdsoError::PatchDoesNotFit { offset: 0x1670, room: 3, bound, .. }
            if bound.contains("next symbol at +0x1673")),
        "{err:?}"
    );
}

#[test]
fn st_size_too_small_for_the_patch_is_an_error() {
    let mut old = kernel("6.1").image.to_vec();
    set_sym(&mut old, 0x930, 42, 0x930, 3);
    let err = build_proxy(&old, OLD_BASE, &syms(kernel("6.18").image), NEAR_ABOVE).unwrap_err();
    println!("{err}");
    assert!(
        matches!(
            err,
            VdsoError::PatchDoesNotFit {
                offset: 0x930,
                patch_len: 5,
                room: 3,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn undecodable_old_code_is_an_error() {
    let mut old = kernel("6.1").image.to_vec();
    // 0x06 (push es) does not exist in 64-bit mode.
    old[0x930..0x930 + 8].fill(0x06);
    let err = build_proxy(&old, OLD_BASE, &syms(kernel("6.18").image), NEAR_ABOVE).unwrap_err();
    println!("{err}");
    assert!(
        matches!(err, VdsoError::NoInstructionBoundary { offset: 0x930, .. }),
        "{err:?}"
    );
}

#[test]
fn a_symbol_outside_the_code_is_an_error() {
    let mut old = kernel("6.1").image.to_vec();
    // Into the ELF header.
    set_sym(&mut old, 0x930, 42, 0x10, 8);
    let err = build_proxy(&old, OLD_BASE, &syms(kernel("6.18").image), NEAR_ABOVE).unwrap_err();
    assert!(
        matches!(err, VdsoError::SymbolNotInCode { offset: 0x10, .. }),
        "{err:?}"
    );
}

#[test]
fn addresses_that_overflow_are_errors() {
    let old = kernel("6.1").image;
    let runtime = syms(kernel("6.18").image);
    let err = build_proxy(old, u64::MAX - 0x1000, &runtime, NEAR_ABOVE).unwrap_err();
    assert!(matches!(err, VdsoError::AddressOverflow { .. }), "{err:?}");
    let err = build_proxy(old, OLD_BASE, &runtime, u64::MAX - 0x100).unwrap_err();
    assert!(matches!(err, VdsoError::AddressOverflow { .. }), "{err:?}");
}

#[test]
fn truncated_images_are_errors_or_valid_proxies() {
    let runtime = syms(kernel("6.18").image);
    for k in kernels() {
        for len in [0, 4, 16, 63, 64, 0x100, 0x400] {
            assert!(
                build_proxy(&k.image[..len], OLD_BASE, &runtime, NEAR_ABOVE).is_err(),
                "{} cut to {len}",
                k.tag
            );
        }
        // Cut inside the code: either the symbols no longer fit (error) or the proxy is sound.
        for len in (0x800..k.image.len()).step_by(0x100) {
            let old = &k.image[..len];
            if let Ok(built) = build_proxy(old, OLD_BASE, &runtime, NEAR_ABOVE) {
                check_build(old, &runtime, NEAR_ABOVE, &built, false);
            }
        }
    }
}

/// Random byte corruption never panics, and whatever builds is still a sound proxy.
#[test]
fn corrupted_images_never_panic() {
    let ks = kernels();
    let runtime = syms(kernel("7.3").image);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        let k = &ks[next() as usize % ks.len()];
        let mut old = k.image.to_vec();
        for _ in 0..1 + next() % 6 {
            let at = (next() % 0x1800) as usize;
            old[at] = next() as u8;
        }
        match build_proxy(&old, OLD_BASE, &runtime, NEAR_ABOVE) {
            Ok(built) => {
                check_build(&old, &runtime, NEAR_ABOVE, &built, false);
                ok += 1;
            }
            Err(_) => err += 1,
        }
    }
    println!("corrupted images: {ok} built, {err} refused");
    assert!(ok > 0 && err > 0);
}

// ---------------------------------------------------------------- encodings

#[test]
fn jump_uses_rel32_exactly_while_it_reaches() {
    let ip = 0x7f00_0000_1000u64;
    let len = |target: u64| x86::jump(ip, target).expect("encodes").len();
    let after = ip + 5;
    assert_eq!(len(after + i32::MAX as u64), 5);
    assert_eq!(len(after + i32::MAX as u64 + 1), 12);
    assert_eq!(len(after - 0x8000_0000), 5);
    assert_eq!(len(after - 0x8000_0001), 12);
    assert_eq!(len(after), 5);
}

#[test]
fn stubs_have_the_documented_bytes() {
    // b8 e5 00 00 00: mov eax, 229; 0f 05: syscall; c3: ret.
    assert_eq!(
        x86::syscall_stub(0x1000, 229).expect("encodes"),
        [0xb8, 0xe5, 0, 0, 0, 0x0f, 0x05, 0xc3]
    );
    // 48 c7 c0 da ff ff ff: mov rax, -38 (sign-extended); c3: ret.
    assert_eq!(
        x86::enosys_stub(0x1000).expect("encodes"),
        [0x48, 0xc7, 0xc0, 0xda, 0xff, 0xff, 0xff, 0xc3]
    );
}
