//! Tests on this machine's live vDSO, on a saved 6.18 image, and on corrupted copies of it.
//! Layout tests from hand-written maps text live in `layout.rs`.

use super::*;

/// The [vdso] of the 6.18 host these tests were written on, saved once from a live process.
const HOST_6_18: &[u8] = include_bytes!("../testdata/vdso-6.18-host.so");

/// Names every x86_64 vDSO since 6.11 exports (with their `__vdso_` prefix), all `LINUX_2.6`.
const KNOWN: [&str; 6] = [
    "__vdso_clock_gettime",
    "__vdso_gettimeofday",
    "__vdso_time",
    "__vdso_getcpu",
    "__vdso_clock_getres",
    "__vdso_getrandom",
];

fn assert_known_symbols(syms: &[VdsoSymbol], image_len: usize) {
    for name in KNOWN {
        let s = syms
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(s.version, "LINUX_2.6", "{name}");
        assert!(s.is_function(), "{name}");
        assert!(s.size > 0, "{name}");
    }
    assert_symbols_inside(syms, image_len);
}

/// The invariant `symbols_from_image` promises for every `Ok`.
fn assert_symbols_inside(syms: &[VdsoSymbol], image_len: usize) {
    for s in syms {
        assert!(
            s.offset + s.size <= image_len as u64,
            "{s:?} outside {image_len} bytes"
        );
        assert!(!s.name.is_empty());
    }
}

// ---------------------------------------------------------------- live process

#[test]
fn live_vdso_is_read_parsed_and_matches_auxv() {
    let me = std::process::id() as i32;
    let layout = VdsoLayout::of_pid(me).expect("own maps");
    println!("live vDSO layout: {}", layout.describe());
    assert!(layout
        .areas
        .iter()
        .all(|a| stasis_abi::is_vdso_area_name(a.name.as_bytes())));
    let vdso = layout.vdso().expect("this process has a [vdso]");
    assert!(
        vdso.size() > 0 && vdso.size().is_multiple_of(4096),
        "{vdso:?}"
    );

    let image = read_image(me, vdso).expect("read own [vdso] through /proc/self/mem");
    assert_eq!(image.len() as u64, vdso.size());
    let syms = symbols_from_image(&image).expect("own vDSO parses");
    for s in &syms {
        println!("  {:#06x} {:5} {}@{}", s.offset, s.size, s.name, s.version);
    }
    assert_known_symbols(&syms, image.len());

    // SAFETY: getauxval has no preconditions.
    let ehdr = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
    assert_eq!(ehdr, vdso.start, "auxv and maps disagree about the vDSO");
    // SAFETY: maps says [vdso] is mapped readable at `ehdr` for `size` bytes, and nothing in this
    // test process unmaps or moves it.
    let in_process = unsafe { std::slice::from_raw_parts(ehdr as *const u8, image.len()) };
    assert!(
        in_process == image.as_slice(),
        "/proc/self/mem and the mapping differ"
    );
}

#[test]
fn read_image_refuses_vvar_and_bogus_areas() {
    let me = std::process::id() as i32;
    let vvar = VdsoArea {
        name: "[vvar]".into(),
        start: 0x1000,
        end: 0x5000,
        prot: 1,
    };
    assert!(matches!(
        read_image(me, &vvar),
        Err(VdsoError::NotVdsoArea { .. })
    ));
    let empty = VdsoArea {
        name: "[vdso]".into(),
        start: 0x1000,
        end: 0x1000,
        prot: 5,
    };
    assert!(matches!(
        read_image(me, &empty),
        Err(VdsoError::BadArea { .. })
    ));
    let huge = VdsoArea {
        name: "[vdso]".into(),
        start: 0,
        end: u64::MAX,
        prot: 5,
    };
    assert!(matches!(
        read_image(me, &huge),
        Err(VdsoError::BadArea { .. })
    ));
    // Page 1 is never mapped (mmap_min_addr): the kernel answers EIO.
    let unmapped = VdsoArea {
        name: "[vdso]".into(),
        start: 0x1000,
        end: 0x3000,
        prot: 5,
    };
    let err = read_image(me, &unmapped).expect_err("unmapped address");
    assert!(
        matches!(err, VdsoError::ReadMem { addr: 0x1000, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("pid {me}")), "{err}");
}

#[test]
fn read_image_of_missing_process_names_the_pid() {
    // pid_max is at most 2^22, so this pid cannot exist.
    let pid = 1 << 23;
    let area = VdsoArea {
        name: "[vdso]".into(),
        start: 0x1000,
        end: 0x3000,
        prot: 5,
    };
    let err = read_image(pid, &area).expect_err("no such process");
    assert!(matches!(err, VdsoError::OpenMem { .. }), "{err:?}");
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
}

// ---------------------------------------------------------------- saved 6.18 image

#[test]
fn saved_6_18_image_exports_in_dynsym_order() {
    let syms = symbols_from_image(HOST_6_18).expect("saved image parses");
    assert_known_symbols(&syms, HOST_6_18.len());
    // dynsym order as `readelf --dyn-syms` shows it; entry 0 (null) and entry 10 (the SHN_ABS
    // `LINUX_2.6` version marker) are not exported.
    let names: Vec<&str> = syms.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "clock_gettime",
            "__vdso_gettimeofday",
            "clock_getres",
            "__vdso_clock_getres",
            "gettimeofday",
            "__vdso_time",
            "__vdso_getrandom",
            "time",
            "__vdso_clock_gettime",
            "__vdso_getcpu",
            "getcpu",
            "getrandom",
        ]
    );
    let gettime = syms
        .iter()
        .find(|s| s.name == "__vdso_clock_gettime")
        .expect("present");
    assert_eq!(
        (gettime.offset, gettime.size, gettime.info),
        (0xaf0, 902, 0x12)
    );
    let weak = syms
        .iter()
        .find(|s| s.name == "clock_gettime")
        .expect("present");
    assert_eq!((weak.offset, weak.info), (0xaf0, 0x22));
}

/// An independent reading through goblin's full parser (section headers, its own symbol count,
/// its section-based versym/verdef) must give the same list on a well-formed image.
#[test]
fn saved_6_18_image_agrees_with_goblin_full_parse() {
    let elf = goblin::elf::Elf::parse(HOST_6_18).expect("goblin parses the saved image");
    let versym = elf.versym.as_ref().expect(".gnu.version");
    let verdef = elf.verdef.as_ref().expect(".gnu.version_d");
    let mut expected = Vec::new();
    for (i, sym) in elf.dynsyms.iter().enumerate() {
        let name = elf.dynstrtab.get_at(sym.st_name).unwrap_or("");
        if !stasis_abi::is_exported_symbol(sym.st_info, sym.st_shndx as u16, name.len()) {
            continue;
        }
        let ndx = versym.get_at(i).expect("versym entry").version();
        let version = verdef
            .iter()
            .find(|d| d.vd_ndx == ndx)
            .and_then(|d| d.iter().next())
            .and_then(|aux| elf.dynstrtab.get_at(aux.vda_name))
            .unwrap_or("");
        expected.push((
            name.to_string(),
            version.to_string(),
            sym.st_value,
            sym.st_size,
        ));
    }
    let ours: Vec<_> = symbols_from_image(HOST_6_18)
        .expect("parses")
        .into_iter()
        .map(|s| (s.name, s.version, s.offset, s.size))
        .collect();
    assert_eq!(ours, expected);
}

// ---------------------------------------------------------------- hand-made variants

/// Little-endian field access for building corrupted copies in tests.
fn rd(image: &[u8], off: usize, n: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&image[off..off + n]);
    u64::from_le_bytes(b)
}

fn wr(image: &mut [u8], off: usize, n: usize, v: u64) {
    image[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
}

/// File offsets of the program headers, in order.
fn phdrs(image: &[u8]) -> Vec<usize> {
    let phoff = rd(image, 32, 8) as usize;
    let phnum = rd(image, 56, 2) as usize;
    (0..phnum).map(|i| phoff + i * 56).collect()
}

/// File offset of the `d_tag` word of each dynamic entry up to DT_NULL.
fn dyn_entries(image: &[u8]) -> Vec<usize> {
    let ph = phdrs(image)
        .into_iter()
        .find(|&p| rd(image, p, 4) == 2)
        .expect("PT_DYNAMIC");
    let (off, size) = (
        rd(image, ph + 8, 8) as usize,
        rd(image, ph + 32, 8) as usize,
    );
    (off..off + size)
        .step_by(16)
        .take_while(|&e| rd(image, e, 8) != 0)
        .collect()
}

fn dyn_entry(image: &[u8], tag: u64) -> usize {
    dyn_entries(image)
        .into_iter()
        .find(|&e| rd(image, e, 8) == tag)
        .expect("tag present")
}

/// The saved image has link base 0, so dynamic addresses are file offsets.
fn dyn_val(image: &[u8], tag: u64) -> usize {
    rd(image, dyn_entry(image, tag) + 8, 8) as usize
}

/// Replaces a dynamic tag by DT_DEBUG, which nothing here reads: the table "disappears".
fn remove_tag(image: &mut [u8], tag: u64) {
    let e = dyn_entry(image, tag);
    wr(image, e, 8, goblin::elf::dynamic::DT_DEBUG);
}

fn host_copy() -> Vec<u8> {
    HOST_6_18.to_vec()
}

#[test]
fn gnu_hash_alone_counts_the_same_symbols() {
    let mut img = host_copy();
    remove_tag(&mut img, goblin::elf::dynamic::DT_HASH);
    assert_eq!(
        symbols_from_image(&img).expect("parses"),
        symbols_from_image(HOST_6_18).unwrap()
    );
}

#[test]
fn sysv_hash_alone_counts_the_same_symbols() {
    let mut img = host_copy();
    remove_tag(&mut img, goblin::elf::dynamic::DT_GNU_HASH);
    assert_eq!(
        symbols_from_image(&img).expect("parses"),
        symbols_from_image(HOST_6_18).unwrap()
    );
}

#[test]
fn no_hash_table_is_an_error() {
    let mut img = host_copy();
    remove_tag(&mut img, goblin::elf::dynamic::DT_HASH);
    remove_tag(&mut img, goblin::elf::dynamic::DT_GNU_HASH);
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::MissingDynamicTag(_))
    ));
}

#[test]
fn hash_tables_disagreeing_is_an_error() {
    let mut img = host_copy();
    let h = dyn_val(&img, goblin::elf::dynamic::DT_HASH);
    wr(&mut img, h + 4, 4, 13);
    let err = symbols_from_image(&img).expect_err("nchain 13 vs 14");
    assert!(
        matches!(
            err,
            VdsoError::HashCountMismatch {
                nchain: 13,
                gnu: 14
            }
        ),
        "{err:?}"
    );
}

#[test]
fn versions_come_from_versym_and_verdef() {
    let versym = dyn_val(HOST_6_18, goblin::elf::dynamic::DT_VERSYM);
    // Symbol 1 (clock_gettime) marked global-unversioned: version becomes empty.
    let mut img = host_copy();
    wr(&mut img, versym + 2, 2, 1);
    let syms = symbols_from_image(&img).expect("parses");
    assert_eq!(
        (syms[0].name.as_str(), syms[0].version.as_str()),
        ("clock_gettime", "")
    );
    assert_eq!(syms[1].version, "LINUX_2.6");
    // The hidden bit does not change which version a symbol has.
    let mut img = host_copy();
    wr(&mut img, versym + 2, 2, 0x8002);
    assert_eq!(
        symbols_from_image(&img).expect("parses")[0].version,
        "LINUX_2.6"
    );
    // An index no Verdef defines.
    let mut img = host_copy();
    wr(&mut img, versym + 2, 2, 7);
    let err = symbols_from_image(&img).expect_err("undefined version index");
    assert!(
        matches!(err, VdsoError::BadVersionIndex { ndx: 7, .. }),
        "{err:?}"
    );
    // No DT_VERSYM at all: every symbol unversioned.
    let mut img = host_copy();
    remove_tag(&mut img, goblin::elf::dynamic::DT_VERSYM);
    assert!(symbols_from_image(&img)
        .expect("parses")
        .iter()
        .all(|s| s.version.is_empty()));
}

// One test per corruption class: each changes exactly one thing and expects its error.

#[test]
fn corrupt_magic() {
    let mut img = host_copy();
    img[1] = b'X';
    assert!(matches!(symbols_from_image(&img), Err(VdsoError::NotElf)));
    assert!(matches!(symbols_from_image(&[]), Err(VdsoError::NotElf)));
}

#[test]
fn corrupt_class_and_machine() {
    let mut img = host_copy();
    img[4] = 1; // ELFCLASS32
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::UnsupportedElf { .. })
    ));
    let mut img = host_copy();
    wr(&mut img, 18, 2, 3); // EM_386
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::UnsupportedElf { .. })
    ));
}

#[test]
fn corrupt_program_headers() {
    let mut img = host_copy();
    wr(&mut img, 32, 8, HOST_6_18.len() as u64 - 8); // e_phoff near the end
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::Elf { .. })
    ));
    let mut img = host_copy();
    for p in phdrs(HOST_6_18) {
        if rd(&img, p, 4) == 1 {
            wr(&mut img, p, 4, 4); // PT_LOAD -> PT_NOTE
        }
    }
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::NoLoadSegment)
    ));
    let mut img = host_copy();
    for p in phdrs(HOST_6_18) {
        if rd(&img, p, 4) == 2 {
            wr(&mut img, p, 4, 4); // PT_DYNAMIC -> PT_NOTE
        }
    }
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::NoDynamic)
    ));
}

#[test]
fn corrupt_dynamic_entries() {
    use goblin::elf::dynamic::{DT_STRSZ, DT_STRTAB, DT_SYMENT, DT_SYMTAB};
    let mut img = host_copy();
    wr(&mut img, dyn_entry(HOST_6_18, DT_SYMENT) + 8, 8, 16);
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::BadSymEnt(16))
    ));
    let mut img = host_copy();
    wr(&mut img, dyn_entry(HOST_6_18, DT_STRTAB) + 8, 8, 0x10_0000);
    let err = symbols_from_image(&img).expect_err("strtab outside");
    assert!(
        matches!(
            err,
            VdsoError::AddressOutsideImage {
                what: "DT_STRTAB",
                ..
            }
        ),
        "{err:?}"
    );
    let mut img = host_copy();
    wr(&mut img, dyn_entry(HOST_6_18, DT_STRSZ) + 8, 8, u64::MAX);
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::TableOutsideImage { .. })
    ));
    let mut img = host_copy();
    remove_tag(&mut img, DT_SYMTAB);
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::MissingDynamicTag("DT_SYMTAB"))
    ));
}

#[test]
fn corrupt_symbol_entries() {
    let symtab = dyn_val(HOST_6_18, goblin::elf::dynamic::DT_SYMTAB);
    let sym = |i: usize| symtab + i * 24;
    // Name offset past DT_STRSZ.
    let mut img = host_copy();
    wr(&mut img, sym(2), 4, 0xffff);
    let err = symbols_from_image(&img).expect_err("bad name");
    assert!(
        matches!(err, VdsoError::BadSymbolName { index: 2, .. }),
        "{err:?}"
    );
    // Value far outside the image.
    let mut img = host_copy();
    wr(&mut img, sym(2) + 8, 8, 0x7fff_0000);
    let err = symbols_from_image(&img).expect_err("value outside");
    assert!(
        matches!(&err, VdsoError::SymbolOutsideImage { name, .. } if name == "__vdso_gettimeofday"),
        "{err:?}"
    );
    // Size running past the end.
    let mut img = host_copy();
    wr(&mut img, sym(2) + 16, 8, u64::MAX);
    assert!(matches!(
        symbols_from_image(&img),
        Err(VdsoError::SymbolOutsideImage { .. })
    ));
    // Made local: silently not exported (the shared rule, not an error).
    let mut img = host_copy();
    img[sym(2) + 4] = 0x02; // STB_LOCAL | STT_FUNC
    let names: Vec<_> = symbols_from_image(&img)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert!(!names.iter().any(|n| n == "__vdso_gettimeofday"));
    assert_eq!(names.len(), 11);
}

#[test]
fn truncated_image_reports_the_symbol_cut_off() {
    // Tables end at 0x580; the first function starts at 0x810.
    let err = symbols_from_image(&HOST_6_18[..0x700]).expect_err("text cut off");
    assert!(
        matches!(err, VdsoError::SymbolOutsideImage { .. }),
        "{err:?}"
    );
    // The dynamic array (0x440..0x580) is the last table; cut into it, goblin refuses it.
    let err = symbols_from_image(&HOST_6_18[..0x500]).expect_err("dynamic cut off");
    assert!(
        matches!(
            err,
            VdsoError::Elf {
                what: "dynamic section",
                ..
            }
        ),
        "{err:?}"
    );
    println!("{err}");
}

// ---------------------------------------------------------------- robustness

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Parses and, on `Ok`, checks the promised invariant; says whether it was `Ok`. A panic fails
/// the test.
fn parse_any(image: &[u8]) -> bool {
    match symbols_from_image(image) {
        Ok(syms) => {
            assert_symbols_inside(&syms, image.len());
            true
        }
        Err(_) => false,
    }
}

#[test]
fn truncation_at_every_length_never_panics() {
    let ok: Vec<usize> = (0..=HOST_6_18.len())
        .filter(|&len| parse_any(&HOST_6_18[..len]))
        .collect();
    // Everything up to the end of the last exported function (getrandom, 0xf40 + 947) is needed.
    assert_eq!(ok.first(), Some(&(0xf40 + 947)));
    assert_eq!(ok.len(), HOST_6_18.len() + 1 - (0xf40 + 947));
}

#[test]
fn random_byte_flips_never_panic() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut ok = 0;
    // Most of the interesting structure sits in the first 0x600 bytes (headers, hash tables,
    // dynsym, dynstr, versions, dynamic); aim most flips there.
    for round in 0..20_000 {
        let mut img = host_copy();
        let span = if round % 4 == 0 { img.len() } else { 0x600 };
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(span);
            img[at] ^= 1 << rng.below(8);
        }
        ok += parse_any(&img) as usize;
    }
    println!("{ok} of 20000 flipped images parsed");
    // Both outcomes must be common, or the flips are not reaching the parser's checks.
    assert!((2_000..18_000).contains(&ok), "{ok}");
}

#[test]
fn random_field_smashing_never_panics() {
    // Overwrite aligned words with values that break offsets and counts: zero, all-ones, huge,
    // small and just-past-the-end.
    let mut rng = Rng(0xfeed_face_cafe_beef);
    let len = HOST_6_18.len() as u64;
    let mut ok = 0;
    let values = [
        0,
        1,
        2,
        0xff,
        0xffff,
        0xffff_ffff,
        u64::MAX,
        u64::MAX / 2,
        len,
        len - 1,
        len + 24,
    ];
    for _ in 0..20_000 {
        let mut img = host_copy();
        for _ in 0..1 + rng.below(3) {
            let width = [2, 4, 8][rng.below(3)];
            let at = rng.below(0x600 / width) * width;
            wr(&mut img, at, width, values[rng.below(values.len())]);
        }
        ok += parse_any(&img) as usize;
        // The same corruption on a truncated copy exercises the end-of-image checks too.
        let cut = rng.below(img.len() + 1);
        parse_any(&img[..cut]);
    }
    println!("{ok} of 20000 smashed images parsed");
    assert!((2_000..18_000).contains(&ok), "{ok}");
}
