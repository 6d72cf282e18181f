//! nvmirror-null: a ublk null device, the floor for benchmarks (`scripts/bench.sh`).
//!
//! Every request completes at once without touching its data, so fio on `/dev/ublkbN` measures
//! only what ublk itself costs: the kernel's copy into the per-tag buffer, the io_uring round
//! trip to this process and back. The device has the same shape as nvmirrord's (queues, depth,
//! 512 KiB per-tag buffers, 4 KiB blocks, no volatile write cache) so the two are comparable.
//!
//! Prints the device path on stdout once the device is live; SIGTERM or SIGINT stops it and
//! deletes the device before exiting.

use anyhow::Context;
use clap::Parser;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags};
use nvmirror::block::{BLOCK_SIZE, MAX_IO_BYTES};
use std::io::Write;
use std::rc::Rc;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "ublk null device: completes every I/O at once (benchmark floor)"
)]
struct Args {
    /// Device id (/dev/ublkbID); -1 lets the kernel pick.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    id: i32,
    /// Number of ublk queues (nvmirrord's default: one per CPU, at most 4). With one queue its
    /// thread may run on any CPU, as nvmirrord's queue threads may.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Queue depth (nvmirrord's default: 64).
    #[arg(long, default_value_t = 64)]
    depth: u16,
    /// Device size in bytes (a multiple of 4096).
    #[arg(long, default_value_t = 16 << 30)]
    size: u64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("nvmirror-null: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size > 0 && args.size.is_multiple_of(BLOCK_SIZE),
        "--size must be a positive multiple of {BLOCK_SIZE}"
    );
    anyhow::ensure!((1..=16).contains(&args.queues), "--queues must be 1 to 16");
    anyhow::ensure!(
        (1..=1024).contains(&args.depth),
        "--depth must be 1 to 1024"
    );
    // One thread takes SIGTERM/SIGINT with sigwait; block them before any thread starts.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block().context("blocking signals")?;

    let ctrl = UblkCtrlBuilder::default()
        .name("nvmirror-null")
        .id(args.id)
        .nr_queues(args.queues)
        .depth(args.depth)
        .io_buf_bytes(MAX_IO_BYTES as u32)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
        .map_err(|e| anyhow::anyhow!("creating the ublk device (is ublk_drv loaded?): {e}"))?;
    let dev_id = ctrl.dev_info().dev_id;

    // On a signal, stop the device: run_target then returns and dropping `ctrl` deletes it.
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.wait().is_ok() {
                if let Ok(c) = UblkCtrl::new_simple(dev_id as i32) {
                    let _ = c.kill_dev();
                }
            }
        })
        .context("spawning the signal thread")?;

    let size = args.size;
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size);
        Ok(())
    };
    let q_fn = move |qid: u16, dev: &UblkDev| {
        if let Err(e) = run_queue(qid, dev) {
            eprintln!("nvmirror-null: queue {qid}: {e}");
        }
    };
    let on_live = move |c: &UblkCtrl| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "/dev/ublkb{}", c.dev_info().dev_id);
        let _ = out.flush();
    };
    ctrl.run_target(tgt_init, q_fn, on_live)
        .map_err(|e| anyhow::anyhow!("running ublk device {dev_id}: {e}"))?;
    drop(ctrl);
    Ok(())
}

/// The same block-layer view as nvmirrord's devices.
fn set_params(dev: &mut UblkDev, size: u64) {
    let shift = BLOCK_SIZE.trailing_zeros() as u8;
    let depth = dev.dev_info.queue_depth;
    let tgt = &mut dev.tgt;
    tgt.dev_size = size;
    tgt.sq_depth = depth;
    tgt.cq_depth = depth;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ublk_param_basic {
            attrs: 0,
            logical_bs_shift: shift,
            physical_bs_shift: shift,
            io_opt_shift: shift,
            io_min_shift: shift,
            max_sectors: (MAX_IO_BYTES >> 9) as u32,
            dev_sectors: size >> 9,
            ..Default::default()
        },
        ..Default::default()
    };
}

/// One thread per queue: a single-threaded executor with one task per tag.
fn run_queue(qid: u16, dev: &UblkDev) -> anyhow::Result<()> {
    let q = Rc::new(UblkQueue::new(qid, dev).map_err(|e| anyhow::anyhow!("{e}"))?);
    let exe = Rc::new(smol::LocalExecutor::new());
    let tasks: Vec<_> = q
        .tags()
        .map(|tag| {
            let q = q.clone();
            exe.spawn(async move {
                match serve_tag(&q, tag).await {
                    Ok(()) | Err(UblkError::QueueIsDown) => {}
                    Err(e) => eprintln!("nvmirror-null: queue {qid} tag {tag}: {e}"),
                }
            })
        })
        .collect();
    let ticker = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while ticker.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await
    }))
    .map_err(|e| anyhow::anyhow!("event loop: {e}"))
}

/// Fetch a request, complete it with its full length, repeat until the queue goes down.
async fn serve_tag(q: &UblkQueue<'_>, tag: u16) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let res = match iod.op_flags & 0xff {
            sys::UBLK_IO_OP_READ
            | sys::UBLK_IO_OP_WRITE
            | sys::UBLK_IO_OP_FLUSH
            | sys::UBLK_IO_OP_DISCARD
            | sys::UBLK_IO_OP_WRITE_ZEROES => (iod.nr_sectors << 9) as i32,
            _ => -libc::EOPNOTSUPP,
        };
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}
