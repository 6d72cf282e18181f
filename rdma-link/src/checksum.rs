//! crc32c (Castagnoli), computed by whichever of two implementations is faster on this CPU.
//!
//! Every record, frame and on-media structure of nvmirror carries a crc32c, so its speed is
//! part of every write's cost. The `crc32c` crate uses the CPU's instruction (SSE 4.2 `crc32`,
//! ARMv8 `crc32c*`) when the CPU reports one; the `crc` crate's slice-by-16 tables use plain
//! loads and shifts. A real CPU runs the instruction about 6x faster than the tables, but a CPU
//! that reports the instruction may still execute it slowly: QEMU's TCG, this project's test VM,
//! emulates it bit by bit (148 MB/s against the tables' 1064 MB/s under `qemu-x86_64 -cpu max`).
//! So, as Linux picks its RAID-6 and XOR routines at boot, the first use times both over
//! 64 KiB and keeps the faster one for the life of the process. At 4 KiB, the common record,
//! they rank the same (`write_path single N 1 4`: natively 21 against 4 GB/s, under
//! `qemu-x86_64 -cpu max` 112 against 1010 MB/s). Both compute the same function (checked by
//! the unit tests), so the choice never changes a stored or sent value.
//!
//! `NVMIRROR_CRC32C=instruction` or `=tables` skips the timing (for A/B measurements).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The two ways to compute a crc32c.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crc32cImpl {
    /// The `crc32c` crate: the CPU's crc32c instruction when it has one (software otherwise).
    Instruction,
    /// The `crc` crate's slice-by-16 tables.
    Tables,
}

impl Crc32cImpl {
    pub fn name(self) -> &'static str {
        match self {
            Crc32cImpl::Instruction => "instruction",
            Crc32cImpl::Tables => "tables",
        }
    }

    fn append(self, crc: u32, data: &[u8]) -> u32 {
        match self {
            Crc32cImpl::Instruction => crc32c::crc32c_append(crc, data),
            Crc32cImpl::Tables => {
                // Continue from a finished crc: undo its final xor; the crate reflects the
                // initial value of a reflected algorithm, so hand it unreflected.
                let mut digest = TABLES.digest_with_initial((!crc).reverse_bits());
                digest.update(data);
                digest.finalize()
            }
        }
    }
}

// A static: the 16 KiB table exists once.
static TABLES: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// How the choice was made, for the daemon's start-up log.
#[derive(Clone, Copy, Debug)]
pub struct Choice {
    pub chosen: Crc32cImpl,
    /// Measured throughput over the timing buffer, MB/s: (instruction, tables); None when the
    /// environment chose.
    pub measured: Option<(f64, f64)>,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.measured {
            Some((ins, tab)) => write!(
                f,
                "crc32c by {} (measured: instruction {ins:.0} MB/s, tables {tab:.0} MB/s)",
                self.chosen.name()
            ),
            None => write!(f, "crc32c by {} (NVMIRROR_CRC32C)", self.chosen.name()),
        }
    }
}

static CHOICE: OnceLock<Choice> = OnceLock::new();

/// The implementation in use (chosen on first call).
pub fn choice() -> Choice {
    *CHOICE.get_or_init(choose)
}

fn choose() -> Choice {
    match std::env::var("NVMIRROR_CRC32C").as_deref() {
        Ok("instruction") => return forced(Crc32cImpl::Instruction),
        Ok("tables") => return forced(Crc32cImpl::Tables),
        Ok(other) => tracing::warn!(
            "NVMIRROR_CRC32C={other:?} is not \"instruction\" or \"tables\"; timing both instead"
        ),
        Err(_) => {}
    }
    let buf: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let ins = best_of(Crc32cImpl::Instruction, &buf);
    let tab = best_of(Crc32cImpl::Tables, &buf);
    let rate = |d: Duration| buf.len() as f64 / d.as_secs_f64().max(1e-9) / 1e6;
    Choice {
        chosen: if tab < ins {
            Crc32cImpl::Tables
        } else {
            Crc32cImpl::Instruction
        },
        measured: Some((rate(ins), rate(tab))),
    }
}

fn forced(chosen: Crc32cImpl) -> Choice {
    Choice {
        chosen,
        measured: None,
    }
}

/// The shortest of a few timed passes (the first also warms the caches and tables).
fn best_of(imp: Crc32cImpl, buf: &[u8]) -> Duration {
    (0..4)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(imp.append(0, std::hint::black_box(buf)));
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::MAX)
}

/// The crc32c of `data` (the same value as `crc32c::crc32c`).
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The crc32c of the bytes `crc` covered followed by `data` (as `crc32c::crc32c_append`).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    choice().chosen.append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn both_implementations_give_the_standard_check_value() {
        // The catalogue's check value for CRC-32/ISCSI over "123456789".
        for imp in [Crc32cImpl::Instruction, Crc32cImpl::Tables] {
            assert_eq!(imp.append(0, b"123456789"), 0xe306_9283, "{imp:?}");
            assert_eq!(imp.append(0, b""), 0, "{imp:?}");
        }
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_choice_is_made_and_described() {
        let c = choice();
        assert!(c.to_string().starts_with("crc32c by "), "{c}");
    }

    proptest! {
        #[test]
        fn tables_equal_the_instruction_whole_and_appended(
            a in proptest::collection::vec(any::<u8>(), 0..300),
            b in proptest::collection::vec(any::<u8>(), 0..300),
            seed in any::<u32>(),
        ) {
            let ins = Crc32cImpl::Instruction;
            let tab = Crc32cImpl::Tables;
            prop_assert_eq!(ins.append(seed, &a), tab.append(seed, &a));
            let whole = [a.as_slice(), b.as_slice()].concat();
            prop_assert_eq!(tab.append(tab.append(0, &a), &b), ins.append(0, &whole));
        }
    }
}
