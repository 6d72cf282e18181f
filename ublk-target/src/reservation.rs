//! SCSI-3 persistent reservations on the shared medium: fencing at the device.
//!
//! With `cluster.reservations = "scsi3"` every node registers its own key with each LUN's
//! medium at start (before its first disk heartbeat), and one of them holds a "write
//! exclusive, registrants only" reservation: registered nodes write, others get RESERVATION
//! CONFLICT from the device itself. A node that takes over ALL of a dead partner's ranges
//! preempts the partner's key first, so a write the partner still has queued anywhere
//! (a paused process, a path that holds I/O) is refused by the disk, whatever the timing.
//! A preempted node cannot even write its disk heartbeat, so it holds no lease and serves
//! nothing until its daemon restarts, which registers it again (as a node fenced by
//! Pacemaker is restarted); it then reads the ownership table and writes only what it owns.
//!
//! The commands go through the SG_IO ioctl (PERSISTENT RESERVE IN/OUT, SPC-4 6.15/6.16);
//! the medium must be a SCSI disk (or one that translates them: iSCSI, FC, SAS, LIO).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const PR_IN: u8 = 0x5e;
const PR_OUT: u8 = 0x5f;
const READ_KEYS: u8 = 0x00;
const READ_RESERVATION: u8 = 0x01;
const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
const RESERVE: u8 = 0x01;
const PREEMPT: u8 = 0x04;
/// Write exclusive, registrants only.
pub const TYPE_WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 0x05;
/// The SAM status of a command refused because of a reservation.
const RESERVATION_CONFLICT: u8 = 0x18;
/// The SAM status of a command that did not run; the sense data say why.
const CHECK_CONDITION: u8 = 0x02;
/// The sense key that only reports an event on this I_T nexus (another initiator changed the
/// registrations or the reservation, the device was reset): the command did not run and is
/// to be sent again. Each event is reported once, to whichever command comes first.
const UNIT_ATTENTION: u8 = 0x06;
/// Sends of one command that may meet a unit attention (events queue up: a reset and a
/// reservation change can both be pending).
const UNIT_ATTENTION_SENDS: usize = 5;
/// `driver_status` of SG_IO when sense data was returned.
const DRIVER_SENSE: u16 = 0x08;
const SG_IO: libc::c_ulong = 0x2285;
const SG_DXFER_NONE: i32 = -1;
const SG_DXFER_TO_DEV: i32 = -2;
const SG_DXFER_FROM_DEV: i32 = -3;
const TIMEOUT_MS: u32 = 10_000;

/// `struct sg_io_hdr` of <scsi/sg.h>.
#[repr(C)]
struct SgIoHdr {
    interface_id: i32,
    dxfer_direction: i32,
    cmd_len: u8,
    mx_sb_len: u8,
    iovec_count: u16,
    dxfer_len: u32,
    dxferp: *mut libc::c_void,
    cmdp: *const u8,
    sbp: *mut u8,
    timeout: u32,
    flags: u32,
    pack_id: i32,
    usr_ptr: *mut libc::c_void,
    status: u8,
    masked_status: u8,
    msg_status: u8,
    sb_len_wr: u8,
    host_status: u16,
    driver_status: u16,
    resid: i32,
    duration: u32,
    info: u32,
}

/// This node's reservation key in cluster `cluster_id`: never 0, different per node.
pub fn key_of(cluster_id: u64, node: u32) -> u64 {
    0x6e76_0000_0000_0000 | ((cluster_id & 0xff_ffff_ffff) << 8) | u64::from(node + 1)
}

/// What the device says about its reservation.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReservationStatus {
    pub device: String,
    /// Registered keys (hex).
    pub keys: Vec<String>,
    /// The holder's key (hex) and type, if reserved.
    pub holder: Option<String>,
    pub kind: Option<u8>,
    /// This node's key (hex) and whether it is registered.
    pub my_key: String,
    pub registered: bool,
    /// Why the device's registrations could not be read (the fields above are then empty,
    /// not a statement that this node lost its registration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One medium's persistent reservation, seen from this node.
pub struct Reservation {
    path: PathBuf,
    file: File,
    key: u64,
}

impl Reservation {
    /// Opens `path` for reservation commands (a SCSI device, or the command fails there).
    pub fn open(path: &Path, key: u64) -> io::Result<Reservation> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        Ok(Reservation {
            path: path.to_owned(),
            file,
            key,
        })
    }

    pub fn key(&self) -> u64 {
        self.key
    }

    /// Registers our key (replacing whatever we had) and, if nobody holds a reservation,
    /// takes the "registrants only" one: from then on only registered nodes write.
    pub fn register_and_reserve(&self) -> io::Result<()> {
        self.out(REGISTER_AND_IGNORE_EXISTING_KEY, 0, 0, self.key)?;
        if self.read_reservation()?.is_none() {
            match self.out(RESERVE, TYPE_WRITE_EXCLUSIVE_REGISTRANTS_ONLY, self.key, 0) {
                Ok(()) => {}
                // The partner reserved it in between: equally good.
                Err(e) if self.read_reservation()?.is_some() => {
                    tracing::debug!(
                        "reserving {}: {e} (the partner holds it)",
                        self.path.display()
                    )
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes `victim`'s registration (a node taken over for good): its writes are refused
    /// by the device from now on. If it held the reservation, we hold it now.
    pub fn preempt(&self, victim: u64) -> io::Result<bool> {
        if !self.read_keys()?.contains(&victim) {
            return Ok(false);
        }
        self.out(
            PREEMPT,
            TYPE_WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
            self.key,
            victim,
        )?;
        Ok(true)
    }

    pub fn read_keys(&self) -> io::Result<Vec<u64>> {
        let mut buf = vec![0u8; 8 + 8 * 32];
        self.inn(READ_KEYS, &mut buf)?;
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
        Ok(buf[8..]
            .chunks_exact(8)
            .take(len / 8)
            .map(|k| u64::from_be_bytes(k.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// The holder's key and the reservation type, if reserved.
    pub fn read_reservation(&self) -> io::Result<Option<(u64, u8)>> {
        let mut buf = vec![0u8; 24];
        self.inn(READ_RESERVATION, &mut buf)?;
        let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len < 16 {
            return Ok(None);
        }
        let key = u64::from_be_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
        Ok(Some((key, buf[21] & 0x0f)))
    }

    pub fn status(&self) -> ReservationStatus {
        let hex = |k: u64| format!("{k:#018x}");
        let (keys, held) = match self
            .read_keys()
            .and_then(|keys| self.read_reservation().map(|held| (keys, held)))
        {
            Ok(read) => read,
            Err(e) => {
                return ReservationStatus {
                    device: self.path.display().to_string(),
                    my_key: hex(self.key),
                    error: Some(e.to_string()),
                    ..ReservationStatus::default()
                }
            }
        };
        ReservationStatus {
            device: self.path.display().to_string(),
            registered: keys.contains(&self.key),
            keys: keys.into_iter().map(hex).collect(),
            holder: held.map(|(k, _)| hex(k)),
            kind: held.map(|(_, t)| t),
            my_key: hex(self.key),
            error: None,
        }
    }

    fn out(&self, action: u8, kind: u8, key: u64, action_key: u64) -> io::Result<()> {
        let mut params = [0u8; 24];
        params[0..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&action_key.to_be_bytes());
        let cdb = [PR_OUT, action, kind & 0x0f, 0, 0, 0, 0, 0, 24, 0];
        self.sg_io(&cdb, SG_DXFER_TO_DEV, &mut params)
            .map_err(|e| self.context(e, "PERSISTENT RESERVE OUT"))
    }

    fn inn(&self, action: u8, buf: &mut [u8]) -> io::Result<()> {
        let len = (buf.len() as u16).to_be_bytes();
        let cdb = [PR_IN, action, 0, 0, 0, 0, 0, len[0], len[1], 0];
        self.sg_io(&cdb, SG_DXFER_FROM_DEV, buf)
            .map_err(|e| self.context(e, "PERSISTENT RESERVE IN"))
    }

    fn context(&self, e: io::Error, what: &str) -> io::Error {
        io::Error::new(e.kind(), format!("{what} on {}: {e}", self.path.display()))
    }

    /// Sends a command, again after each unit attention (up to [`UNIT_ATTENTION_SENDS`]).
    fn sg_io(&self, cdb: &[u8], direction: i32, data: &mut [u8]) -> io::Result<()> {
        let mut sends = 1;
        loop {
            match self.sg_io_once(cdb, direction, data) {
                Err(SgError::UnitAttention(_)) if sends < UNIT_ATTENTION_SENDS => sends += 1,
                Err(SgError::UnitAttention(e) | SgError::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    }

    fn sg_io_once(&self, cdb: &[u8], direction: i32, data: &mut [u8]) -> Result<(), SgError> {
        let mut sense = [0u8; 32];
        let mut hdr = SgIoHdr {
            interface_id: b'S' as i32,
            dxfer_direction: if data.is_empty() {
                SG_DXFER_NONE
            } else {
                direction
            },
            cmd_len: cdb.len() as u8,
            mx_sb_len: sense.len() as u8,
            iovec_count: 0,
            dxfer_len: data.len() as u32,
            dxferp: data.as_mut_ptr().cast(),
            cmdp: cdb.as_ptr(),
            sbp: sense.as_mut_ptr(),
            timeout: TIMEOUT_MS,
            flags: 0,
            pack_id: 0,
            usr_ptr: std::ptr::null_mut(),
            status: 0,
            masked_status: 0,
            msg_status: 0,
            sb_len_wr: 0,
            host_status: 0,
            driver_status: 0,
            resid: 0,
            duration: 0,
            info: 0,
        };
        // SAFETY: SG_IO reads the header, the CDB and (for writes) `data`, and writes the
        // header, `sense` and (for reads) `data`; all outlive the call and their lengths
        // are in the header.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), SG_IO as _, &mut hdr) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(SgError::Failed(io::Error::new(
                e.kind(),
                format!("{e} (is it a SCSI device? reservations need one)"),
            )));
        }
        if hdr.status == RESERVATION_CONFLICT {
            return Err(SgError::Failed(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "RESERVATION CONFLICT (another node preempted this node's key)",
            )));
        }
        // DRIVER_SENSE (8) only says sense data came back: with status GOOD that is not an
        // error. Any other driver status (timeout, error, ...) is.
        let driver_failed = !matches!(hdr.driver_status & 0x0f, 0 | DRIVER_SENSE);
        if hdr.status != 0 || hdr.host_status != 0 || driver_failed {
            let n = usize::from(hdr.sb_len_wr).min(sense.len());
            let e = io::Error::other(format!(
                "SCSI status {:#04x}, host {:#06x}, driver {:#06x}, sense {:02x?}",
                hdr.status,
                hdr.host_status,
                hdr.driver_status,
                &sense[..n]
            ));
            if hdr.status == CHECK_CONDITION && sense_key(&sense[..n]) == Some(UNIT_ATTENTION) {
                return Err(SgError::UnitAttention(e));
            }
            return Err(SgError::Failed(e));
        }
        Ok(())
    }
}

/// How one SG_IO command failed.
enum SgError {
    /// Not run because of an event to report (send it again).
    UnitAttention(io::Error),
    Failed(io::Error),
}

/// The sense key of fixed-format (0x70, 0x71) or descriptor-format (0x72, 0x73) sense data.
fn sense_key(sense: &[u8]) -> Option<u8> {
    match sense.first()? & 0x7f {
        0x70 | 0x71 => sense.get(2).map(|b| b & 0x0f),
        0x72 | 0x73 => sense.get(1).map(|b| b & 0x0f),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A unit attention (here "registrations preempted", ASC 0x2a/0x05, and "power on or
    /// reset", 0x29) is told apart from real errors in both sense formats.
    #[test]
    fn unit_attention_is_recognised_in_both_sense_formats() {
        let fixed = [0x70, 0, 0x06, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x2a, 0x05];
        let descriptor = [0x72, 0x06, 0x29, 0x00, 0, 0, 0, 0];
        let illegal_request = [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0];
        assert_eq!(sense_key(&fixed), Some(UNIT_ATTENTION));
        assert_eq!(sense_key(&descriptor), Some(UNIT_ATTENTION));
        assert_eq!(sense_key(&illegal_request), Some(0x05));
        assert_eq!(sense_key(&[]), None);
        assert_eq!(sense_key(&[0x70, 0]), None);
    }

    #[test]
    fn keys_differ_per_node_and_cluster_and_are_never_zero() {
        assert_ne!(key_of(1, 0), key_of(1, 1));
        assert_ne!(key_of(1, 0), key_of(2, 0));
        assert_ne!(key_of(0, 0), 0);
    }

    #[test]
    fn a_file_is_refused_with_a_clear_error() {
        let f = std::env::temp_dir().join(format!("nvm-pr-{}", std::process::id()));
        std::fs::write(&f, [0u8; 4096]).expect("write");
        let r = Reservation::open(&f, key_of(1, 0)).expect("open");
        let e = r
            .register_and_reserve()
            .expect_err("a file has no reservations");
        assert!(e.to_string().contains("SCSI device"), "{e}");
        let _ = std::fs::remove_file(f);
    }
}
