//! The only part of the proxy that knows x86-64 instruction bytes: encoding the patches and
//! decoding old vDSO code to place them safely and to tell whether a function reaches vvar.
//!
//! Every encoding goes through iced's `BlockEncoder` with `DONT_FIX_BRANCHES`: the encoder must
//! never widen or rewrite a branch behind our back, because the byte count it returns is checked
//! against the room the old function leaves and a silently longer patch would overwrite the next
//! function.

use std::collections::BTreeSet;
use std::ops::Range;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, IcedError,
    Instruction, InstructionBlock, OpKind, Register,
};

/// `-ENOSYS` as a function result.
const ENOSYS: i32 = -38;

/// Length of `jmp rel32`.
const JMP_REL32_LEN: u64 = 5;

/// Instructions decoded at most while deciding whether a function reaches outside the image.
/// The largest real vDSO function is about 1000 bytes; a budget this size only stops a crafted
/// image from making the walk long, and running out counts as "reaches outside".
const WALK_BUDGET: usize = 20_000;

/// `jmp target` for code placed at `ip`: `jmp rel32` (5 bytes) when the displacement fits,
/// else `movabs rax, target; jmp rax` (12 bytes). rax is caller-saved and carries no argument
/// of any vDSO function, so clobbering it before the callee runs is invisible to the caller.
pub(super) fn jump(ip: u64, target: u64) -> Result<Vec<u8>, IcedError> {
    let displacement = i128::from(target) - (i128::from(ip) + i128::from(JMP_REL32_LEN));
    if i32::try_from(displacement).is_ok() {
        encode(ip, &[Instruction::with_branch(Code::Jmp_rel32_64, target)?])
    } else {
        encode(
            ip,
            &[
                Instruction::with2(Code::Mov_r64_imm64, Register::RAX, target)?,
                Instruction::with1(Code::Jmp_rm64, Register::RAX)?,
            ],
        )
    }
}

/// `mov eax, nr; syscall; ret`. The vDSO functions proxied this way take their syscall's
/// arguments in rdi/rsi/rdx, the syscall's own first three registers; none of these syscalls
/// has a fourth (which the kernel would read from r10, not rcx), and getrandom's extra
/// opaque-state arguments (rcx, r8) are simply not passed on. `syscall` clobbers only rcx and
/// r11, both caller-saved. Writing eax zero-extends into rax, so rax is exactly `nr`.
pub(super) fn syscall_stub(ip: u64, nr: u32) -> Result<Vec<u8>, IcedError> {
    encode(
        ip,
        &[
            Instruction::with2(Code::Mov_r32_imm32, Register::EAX, nr)?,
            Instruction::with(Code::Syscall),
            Instruction::with(Code::Retnq),
        ],
    )
}

/// `mov rax, -ENOSYS; ret`. The immediate is sign-extended to 64 bits so that functions
/// returning `long` (time_t, ssize_t) see -38 too, not 0xffffffda.
pub(super) fn enosys_stub(ip: u64) -> Result<Vec<u8>, IcedError> {
    encode(
        ip,
        &[
            Instruction::with2(Code::Mov_rm64_imm32, Register::RAX, ENOSYS)?,
            Instruction::with(Code::Retnq),
        ],
    )
}

fn encode(ip: u64, instructions: &[Instruction]) -> Result<Vec<u8>, IcedError> {
    let block = InstructionBlock::new(instructions, ip);
    let encoded = BlockEncoder::encode(64, block, BlockEncoderOptions::DONT_FIX_BRANCHES)?;
    Ok(encoded.code_buffer)
}

/// The first instruction boundary of `code` (old code placed at `ip`, decoded from its first
/// byte) at or after `at_least` bytes, or `None` when the code does not decode that far: an
/// invalid instruction, or one running past the end of `code`.
pub(super) fn instruction_boundary(code: &[u8], ip: u64, at_least: usize) -> Option<usize> {
    let mut decoder = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            return None;
        }
        if decoder.position() >= at_least {
            return Some(decoder.position());
        }
    }
    // Only reached for `at_least == 0` on empty code, or when `at_least > code.len()`.
    (at_least == 0).then_some(0)
}

/// Where the old image lives and which of its bytes are code.
pub(super) struct OldCode<'a> {
    pub image: &'a [u8],
    /// Address of image byte 0 after restore.
    pub base: u64,
    /// Image offset ranges holding executable code (`Segments::code_ranges`).
    pub code: &'a [Range<u64>],
}

impl OldCode<'_> {
    /// Whether the function at image offset `entry` may touch memory outside the image: vvar
    /// (mapped below the vDSO on every kernel seen) or anything else. `size` is the symbol's
    /// `st_size` when known.
    ///
    /// The walk covers the whole `[entry, entry + size)` when the size is known, and follows
    /// control flow from the entry in any case: direct calls and jumps to code elsewhere in the
    /// image are followed (a shared helper reading vvar counts), a path ends at `ret`, at an
    /// unconditional or indirect jump, or at `int3`/`ud2`. It answers "yes" for any RIP-relative
    /// memory operand (including `lea`, which is how vvar pointers are formed) or absolute one
    /// whose address is outside the image, for a direct branch out of the image's code, and —
    /// being the cautious answer — for undecodable code or an exhausted budget.
    pub fn reaches_outside(&self, entry: u64, size: Option<u64>) -> bool {
        let mut walk = Walk {
            old: self,
            pending: vec![entry],
            seen: BTreeSet::new(),
            budget: WALK_BUDGET,
        };
        if let Some(size) = size {
            if walk.sweep(entry, entry.saturating_add(size), false) {
                return true;
            }
        }
        while let Some(start) = walk.pending.pop() {
            if walk.seen.insert(start) && walk.sweep(start, u64::MAX, true) {
                return true;
            }
        }
        false
    }

    fn code_range_of(&self, offset: u64) -> Option<&Range<u64>> {
        self.code.iter().find(|r| r.contains(&offset))
    }

    /// The image offset `address` stands for, if it is inside the image.
    fn offset_of(&self, address: u64) -> Option<u64> {
        let offset = address.wrapping_sub(self.base);
        (offset < self.image.len() as u64).then_some(offset)
    }

    /// True when a memory operand of `instruction` addresses something outside the image.
    fn memory_outside(&self, instruction: &Instruction) -> bool {
        let has_memory =
            (0..instruction.op_count()).any(|i| instruction.op_kind(i) == OpKind::Memory);
        if !has_memory {
            return false;
        }
        if instruction.is_ip_rel_memory_operand() {
            return self
                .offset_of(instruction.ip_rel_memory_address())
                .is_none();
        }
        let absolute = instruction.memory_base() == Register::None
            && instruction.memory_index() == Register::None;
        absolute
            && self
                .offset_of(instruction.memory_displacement64())
                .is_none()
    }
}

/// State of one `reaches_outside` walk.
struct Walk<'o, 'a> {
    old: &'o OldCode<'a>,
    pending: Vec<u64>,
    seen: BTreeSet<u64>,
    budget: usize,
}

impl Walk<'_, '_> {
    /// Decodes from image offset `start` to `end` (clipped to the code range holding `start`),
    /// queueing direct branch targets. With `follow_flow`, stops where control cannot fall
    /// through. Returns true as soon as something reaches outside the image.
    fn sweep(&mut self, start: u64, end: u64, follow_flow: bool) -> bool {
        let Some(range) = self.old.code_range_of(start) else {
            return true;
        };
        let end = end.min(range.end);
        // In range: code ranges are clipped to the image length.
        let Some(bytes) = self.old.image.get(start as usize..end as usize) else {
            return true;
        };
        let ip = self.old.base.wrapping_add(start);
        let mut decoder = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
        let mut instruction = Instruction::default();
        while decoder.can_decode() {
            if self.budget == 0 {
                return true;
            }
            self.budget -= 1;
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() || self.old.memory_outside(&instruction) {
                return true;
            }
            if let Some(target) = near_branch_target(&instruction) {
                match self.old.offset_of(target) {
                    Some(t) if self.old.code_range_of(t).is_some() => self.pending.push(t),
                    _ => return true,
                }
            }
            if follow_flow && ends_path(&instruction) {
                return false;
            }
        }
        // A linear sweep ends where asked; a path that runs off the end of the code leaves it.
        follow_flow
    }
}

fn near_branch_target(instruction: &Instruction) -> Option<u64> {
    (0..instruction.op_count())
        .any(|i| {
            matches!(
                instruction.op_kind(i),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            )
        })
        .then(|| instruction.near_branch_target())
}

/// Control cannot fall through to the next instruction.
fn ends_path(instruction: &Instruction) -> bool {
    match instruction.flow_control() {
        FlowControl::Return
        | FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::Exception => true,
        FlowControl::Interrupt => instruction.code() == Code::Int3,
        _ => false,
    }
}
