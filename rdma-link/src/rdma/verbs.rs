//! A small safe layer over rdma-sys (libibverbs + librdmacm).
//!
//! Every raw object has one RAII owner; an owner keeps an `Arc` of each object it depends on,
//! so destruction always runs in a valid order whatever order the caller drops things in:
//! QP -> MR -> CQ -> completion channel -> PD -> cm_id -> event channel.
//! All `unsafe` of the RDMA transport lives in this file — its one job, which is why it is
//! longer than the other modules.

use rdma_sys::*;
use std::ffi::CStr;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;

/// Error of one verbs / rdma_cm call.
#[derive(Debug)]
pub(crate) struct VerbsError {
    pub op: &'static str,
    pub err: io::Error,
}

impl std::fmt::Display for VerbsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.op, self.err)
    }
}

pub(crate) type VResult<T> = Result<T, VerbsError>;

/// Kernel `IB_UVERBS_DEVICE_FLUSH_GLOBAL` / `_PERSISTENT` bits of `device_cap_flags_ex`.
pub(crate) const CAP_FLUSH_GLOBAL: u64 = 1 << 38;
pub(crate) const CAP_FLUSH_PERSISTENT: u64 = 1 << 39;

fn last(op: &'static str) -> VerbsError {
    VerbsError {
        op,
        err: io::Error::last_os_error(),
    }
}

fn check(op: &'static str, rc: i32) -> VResult<()> {
    if rc == 0 {
        Ok(())
    } else if rc > 0 {
        // verbs calls return a positive errno, rdma_cm calls -1 + errno.
        Err(VerbsError {
            op,
            err: io::Error::from_raw_os_error(rc),
        })
    } else {
        Err(last(op))
    }
}

fn set_nonblocking(fd: RawFd, op: &'static str) -> VResult<()> {
    // SAFETY: fcntl on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(last(op));
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last(op));
    }
    Ok(())
}

/// The fd of an event channel or completion channel, keeping its owner (and so the fd) alive
/// for as long as tokio watches it.
pub(crate) enum ChannelFd {
    Cm(Arc<EventChannel>),
    Comp(Arc<CompChannel>),
}

impl AsRawFd for ChannelFd {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            ChannelFd::Cm(c) => c.fd(),
            ChannelFd::Comp(c) => c.fd(),
        }
    }
}

impl ChannelFd {
    /// Register with the current tokio reactor (readable interest).
    pub(crate) fn register(self) -> io::Result<tokio::io::unix::AsyncFd<ChannelFd>> {
        // SAFETY: the fd belongs to the channel this value holds an Arc of, so it stays open and
        // refers to the same description until the AsyncFd (which owns this value) is dropped;
        // as_raw_fd always returns that same fd.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)
    }
}

// ---------------------------------------------------------------------------------------------
// rdma_cm

pub(crate) struct EventChannel {
    raw: *mut rdma_event_channel,
}

// SAFETY: librdmacm event channels may be used from any thread (the library locks internally);
// this owner is the only one to destroy it.
unsafe impl Send for EventChannel {}
// SAFETY: see Send.
unsafe impl Sync for EventChannel {}

impl EventChannel {
    pub(crate) fn new() -> VResult<Arc<EventChannel>> {
        // SAFETY: plain constructor; NULL on failure (checked).
        let raw = unsafe { rdma_create_event_channel() };
        if raw.is_null() {
            return Err(last(
                "rdma_create_event_channel (is the rdma_ucm module loaded?)",
            ));
        }
        let ch = EventChannel { raw };
        set_nonblocking(ch.fd(), "making the rdma_cm event channel non-blocking")?;
        Ok(Arc::new(ch))
    }

    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: raw is a live channel owned by self.
        unsafe { (*self.raw).fd }
    }

    /// The next event, or None if none is pending (the fd is non-blocking).
    pub(crate) fn get(&self) -> VResult<Option<CmEvent>> {
        let mut ev: *mut rdma_cm_event = ptr::null_mut();
        // SAFETY: valid channel; ev is an out-parameter.
        let rc = unsafe { rdma_get_cm_event(self.raw, &mut ev) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(VerbsError {
                op: "rdma_get_cm_event",
                err: e,
            });
        }
        Ok(Some(CmEvent { raw: ev }))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every cm_id on this channel holds an Arc to it, so none is left.
        unsafe { rdma_destroy_event_channel(self.raw) }
    }
}

/// A received rdma_cm event; acknowledged on drop.
pub(crate) struct CmEvent {
    raw: *mut rdma_cm_event,
}

// SAFETY: an event may be read and acknowledged from any thread; this owner acks it once.
unsafe impl Send for CmEvent {}

impl CmEvent {
    pub(crate) fn kind(&self) -> rdma_cm_event_type::Type {
        // SAFETY: raw is a live, unacknowledged event.
        unsafe { (*self.raw).event }
    }
    pub(crate) fn status(&self) -> i32 {
        // SAFETY: as above.
        unsafe { (*self.raw).status }
    }
    pub(crate) fn id(&self) -> *mut rdma_cm_id {
        // SAFETY: as above.
        unsafe { (*self.raw).id }
    }
    pub(crate) fn name(&self) -> String {
        // SAFETY: rdma_event_str returns a static C string for any value.
        unsafe { CStr::from_ptr(rdma_event_str(self.kind())) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for CmEvent {
    fn drop(&mut self) {
        // SAFETY: acknowledged exactly once, here.
        unsafe { rdma_ack_cm_event(self.raw) };
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from_ne_bytes(a.ip().octets()),
            };
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            (
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

pub(crate) struct CmId {
    raw: *mut rdma_cm_id,
    channel: Arc<EventChannel>,
}

// SAFETY: rdma_cm ids may be used from any thread; this owner destroys it once.
unsafe impl Send for CmId {}
// SAFETY: see Send.
unsafe impl Sync for CmId {}

impl CmId {
    pub(crate) fn new(channel: Arc<EventChannel>) -> VResult<CmId> {
        let mut raw = ptr::null_mut();
        // SAFETY: valid channel; raw is an out-parameter.
        check("rdma_create_id", unsafe {
            rdma_create_id(
                channel.raw,
                &mut raw,
                ptr::null_mut(),
                rdma_port_space::RDMA_PS_TCP,
            )
        })?;
        Ok(CmId { raw, channel })
    }

    /// Take ownership of the id a CONNECT_REQUEST event announced, moving it to `channel`.
    /// The event must already be acknowledged (rdma_migrate_id waits for that).
    ///
    /// # Safety
    /// `raw` must be the id of a CONNECT_REQUEST event that nobody else owns.
    pub(crate) unsafe fn from_request(
        raw: *mut rdma_cm_id,
        channel: Arc<EventChannel>,
    ) -> VResult<CmId> {
        // The id is ours from here even if migrating fails: destroy it on error.
        let id = CmId {
            raw,
            channel: channel.clone(),
        };
        // SAFETY: live id and channel.
        check("rdma_migrate_id", unsafe {
            rdma_migrate_id(raw, channel.raw)
        })?;
        Ok(id)
    }

    pub(crate) fn channel(&self) -> &Arc<EventChannel> {
        &self.channel
    }

    pub(crate) fn bind(&self, addr: SocketAddr) -> VResult<()> {
        let (mut ss, _) = sockaddr(addr);
        // SAFETY: live id; ss is a valid sockaddr for the call's duration.
        check("rdma_bind_addr", unsafe {
            rdma_bind_addr(self.raw, &mut ss as *mut _ as *mut libc::sockaddr)
        })
    }

    pub(crate) fn listen(&self, backlog: i32) -> VResult<()> {
        // SAFETY: live, bound id.
        check("rdma_listen", unsafe { rdma_listen(self.raw, backlog) })
    }

    pub(crate) fn resolve_addr(&self, dst: SocketAddr, timeout_ms: i32) -> VResult<()> {
        let (mut ss, _) = sockaddr(dst);
        // SAFETY: live id; ss lives for the call (librdmacm copies it).
        check("rdma_resolve_addr", unsafe {
            rdma_resolve_addr(
                self.raw,
                ptr::null_mut(),
                &mut ss as *mut _ as *mut libc::sockaddr,
                timeout_ms,
            )
        })
    }

    pub(crate) fn resolve_route(&self, timeout_ms: i32) -> VResult<()> {
        // SAFETY: live id with a resolved address.
        check("rdma_resolve_route", unsafe {
            rdma_resolve_route(self.raw, timeout_ms)
        })
    }

    fn conn_param(window: u8) -> rdma_conn_param {
        rdma_conn_param {
            private_data: ptr::null(),
            private_data_len: 0,
            responder_resources: window,
            initiator_depth: window,
            flow_control: 1,
            retry_count: 7,
            // 7 = retry forever on receiver-not-ready: a burst of control messages waits for
            // the peer to repost receive buffers instead of failing the connection.
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        }
    }

    pub(crate) fn connect(&self) -> VResult<()> {
        let mut p = Self::conn_param(1);
        // SAFETY: live id with a QP; p lives for the call.
        check("rdma_connect", unsafe { rdma_connect(self.raw, &mut p) })
    }

    pub(crate) fn accept(&self) -> VResult<()> {
        let mut p = Self::conn_param(1);
        // SAFETY: live id of a connect request with a QP; p lives for the call.
        check("rdma_accept", unsafe { rdma_accept(self.raw, &mut p) })
    }

    pub(crate) fn reject(&self) {
        // SAFETY: live id of a connect request; no private data.
        unsafe { rdma_reject(self.raw, ptr::null(), 0) };
    }

    pub(crate) fn disconnect(&self) {
        // SAFETY: live id; failing (e.g. not connected) is harmless.
        unsafe { rdma_disconnect(self.raw) };
    }

    /// The remote address of a connected id or of a connection request, if it is IPv4 / IPv6.
    pub(crate) fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: live id; `route.addr` is plain data librdmacm fills in for a connection
        // request (and after address resolution); reading the union as sockaddr_storage, the
        // largest member, copies whatever it holds.
        let ss: libc::sockaddr_storage =
            unsafe { (*self.raw).route.addr.dst_addr_union.dst_storage };
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                // SAFETY: the family says this storage holds a sockaddr_in.
                let sin = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in) };
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => {
                // SAFETY: the family says this storage holds a sockaddr_in6.
                let sin6 = unsafe { &*(&ss as *const _ as *const libc::sockaddr_in6) };
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
            }
            _ => None,
        }
    }

    /// The device context the id is bound to (null before address resolution).
    fn verbs(&self) -> *mut ibv_context {
        // SAFETY: live id.
        unsafe { (*self.raw).verbs }
    }

    pub(crate) fn device_name(&self) -> String {
        let ctx = self.verbs();
        if ctx.is_null() {
            return "?".into();
        }
        // SAFETY: a live context has a live device with a NUL-terminated name.
        unsafe { CStr::from_ptr(ibv_get_device_name((*ctx).device)) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        // SAFETY: the QP (which holds an Arc of this id) is gone; every event of this id was
        // acknowledged when its CmEvent dropped.
        unsafe { rdma_destroy_id(self.raw) };
    }
}

// ---------------------------------------------------------------------------------------------
// verbs

pub(crate) struct Pd {
    raw: *mut ibv_pd,
    id: Arc<CmId>,
}

// SAFETY: verbs objects are thread-safe in libibverbs; single owner destroys it.
unsafe impl Send for Pd {}
// SAFETY: see Send.
unsafe impl Sync for Pd {}

impl Pd {
    pub(crate) fn new(id: Arc<CmId>) -> VResult<Arc<Pd>> {
        let ctx = id.verbs();
        if ctx.is_null() {
            return Err(VerbsError {
                op: "ibv_alloc_pd",
                err: io::Error::other("the cm_id has no device yet"),
            });
        }
        // SAFETY: live context (owned by the id, which we keep alive).
        let raw = unsafe { ibv_alloc_pd(ctx) };
        if raw.is_null() {
            return Err(last("ibv_alloc_pd"));
        }
        Ok(Arc::new(Pd { raw, id }))
    }

    /// FLUSH / atomic-write capability bits of the device (kernel `IB_UVERBS_DEVICE_*`).
    pub(crate) fn device_caps_ex(&self) -> Option<u64> {
        // SAFETY: zeroed is a valid ibv_device_attr_ex; the call fills it.
        let mut attr: ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        // SAFETY: live context; attr lives for the call.
        let rc = unsafe { ibv_query_device_ex(self.id.verbs(), ptr::null(), &mut attr) };
        (rc == 0).then_some(attr.device_cap_flags_ex)
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every MR and QP of this PD holds an Arc to it, so none is left.
        unsafe { ibv_dealloc_pd(self.raw) };
    }
}

pub(crate) struct CompChannel {
    raw: *mut ibv_comp_channel,
    _id: Arc<CmId>,
}

// SAFETY: see Pd.
unsafe impl Send for CompChannel {}
// SAFETY: see Pd.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    pub(crate) fn new(id: Arc<CmId>) -> VResult<Arc<CompChannel>> {
        // SAFETY: live context.
        let raw = unsafe { ibv_create_comp_channel(id.verbs()) };
        if raw.is_null() {
            return Err(last("ibv_create_comp_channel"));
        }
        let ch = CompChannel { raw, _id: id };
        set_nonblocking(ch.fd(), "making the completion channel non-blocking")?;
        Ok(Arc::new(ch))
    }
    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: live channel.
        unsafe { (*self.raw).fd }
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: the CQ using it holds an Arc, so it is already destroyed.
        unsafe { ibv_destroy_comp_channel(self.raw) };
    }
}

/// A completion, decoded from `ibv_wc`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub byte_len: u32,
    pub vendor_err: u32,
}

impl Completion {
    pub(crate) fn ok(&self) -> bool {
        self.status == ibv_wc_status::IBV_WC_SUCCESS
    }
    pub(crate) fn is_recv(&self) -> bool {
        self.opcode & ibv_wc_opcode::IBV_WC_RECV != 0
    }
    pub(crate) fn status_str(&self) -> String {
        // SAFETY: ibv_wc_status_str returns a static string for any value.
        unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) }
            .to_string_lossy()
            .into_owned()
    }
}

pub(crate) struct Cq {
    raw: *mut ibv_cq,
    channel: Arc<CompChannel>,
    /// Events taken from the channel but not yet acknowledged.
    unacked: u32,
}

// SAFETY: see Pd.
unsafe impl Send for Cq {}

impl Cq {
    pub(crate) fn new(id: &CmId, channel: Arc<CompChannel>, depth: i32) -> VResult<Cq> {
        // SAFETY: live context and channel.
        let raw = unsafe { ibv_create_cq(id.verbs(), depth, ptr::null_mut(), channel.raw, 0) };
        if raw.is_null() {
            return Err(last("ibv_create_cq"));
        }
        Ok(Cq {
            raw,
            channel,
            unacked: 0,
        })
    }

    /// Ask for an event on the next completion.
    pub(crate) fn arm(&self) -> VResult<()> {
        // SAFETY: live CQ.
        check("ibv_req_notify_cq", unsafe {
            ibv_req_notify_cq(self.raw, 0)
        })
    }

    /// Consume pending channel events (non-blocking); returns how many.
    pub(crate) fn take_events(&mut self) -> VResult<u32> {
        let mut n = 0;
        loop {
            let mut cq = ptr::null_mut();
            let mut ctx = ptr::null_mut();
            // SAFETY: live channel; out-parameters.
            let rc = unsafe { ibv_get_cq_event(self.channel.raw, &mut cq, &mut ctx) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    break;
                }
                return Err(VerbsError {
                    op: "ibv_get_cq_event",
                    err: e,
                });
            }
            n += 1;
        }
        self.unacked += n;
        if self.unacked >= 64 {
            // SAFETY: acknowledging events we took from this CQ's channel.
            unsafe { ibv_ack_cq_events(self.raw, self.unacked) };
            self.unacked = 0;
        }
        Ok(n)
    }

    /// Poll up to `out.capacity()` completions into `out`.
    pub(crate) fn poll(&self, out: &mut Vec<Completion>, max: usize) -> VResult<usize> {
        // SAFETY: ibv_wc is plain data; zeroed is a valid value.
        let mut wcs: [ibv_wc; 32] = unsafe { std::mem::zeroed() };
        let mut total = 0;
        while total < max {
            // SAFETY: live CQ; wcs has room for 32 entries.
            let n = unsafe { ibv_poll_cq(self.raw, 32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(VerbsError {
                    op: "ibv_poll_cq",
                    err: io::Error::from_raw_os_error(-n),
                });
            }
            for wc in &wcs[..n as usize] {
                out.push(Completion {
                    wr_id: wc.wr_id,
                    status: wc.status,
                    opcode: wc.opcode,
                    byte_len: wc.byte_len,
                    vendor_err: wc.vendor_err,
                });
            }
            total += n as usize;
            if n < 32 {
                break;
            }
        }
        Ok(total)
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: the QP using this CQ is destroyed first (it is dropped before the CQ: the
        // connection owns both, QP field first, and Qp cannot outlive it); pending events are
        // acknowledged before destroying, as ibv_destroy_cq requires.
        unsafe {
            if self.unacked > 0 {
                ibv_ack_cq_events(self.raw, self.unacked);
            }
            ibv_destroy_cq(self.raw);
        }
    }
}

/// A memory registration. Holds the PD; the memory itself is owned elsewhere (see `RegBuf` and
/// the `Region` contract).
pub(crate) struct Mr {
    raw: *mut ibv_mr,
    _pd: Arc<Pd>,
}

// SAFETY: see Pd.
unsafe impl Send for Mr {}
// SAFETY: see Pd.
unsafe impl Sync for Mr {}

pub(crate) const ACCESS_LOCAL: i32 = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32;
pub(crate) const ACCESS_REMOTE_WRITE: i32 = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
    | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0)
    as i32;

impl Mr {
    /// # Safety
    /// `addr..addr+len` must stay valid (mapped) until this Mr is dropped.
    pub(crate) unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: i32,
    ) -> VResult<Mr> {
        // SAFETY: live PD; memory validity is the caller's contract.
        let raw = unsafe { ibv_reg_mr(pd.raw, addr.cast(), len, access) };
        if raw.is_null() {
            return Err(last(
                "ibv_reg_mr (ENOMEM: raise the memlock limit, see `ulimit -l`; EFAULT: the \
                 kernel refuses to pin this memory long-term, e.g. an NVRAM mapped from \
                 /dev/pmemN or a file on a disk filesystem: put the NVRAM on device-DAX \
                 (/dev/daxN.M, `ndctl create-namespace --mode=devdax`), or use the TCP transport)",
            ));
        }
        Ok(Mr {
            raw,
            _pd: pd.clone(),
        })
    }
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: live MR.
        unsafe { (*self.raw).lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: live MR.
        unsafe { (*self.raw).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: live MR; the QP that could still access it is destroyed first (connection
        // field order) — a deregistered MR is never used by a posted WR.
        unsafe { ibv_dereg_mr(self.raw) };
    }
}

/// An owned, registered buffer split into equal slots (control messages).
pub(crate) struct RegBuf {
    mr: Mr,
    // Dropped after `mr` (field order): the registration never outlives the memory.
    buf: Box<[u8]>,
    slot: usize,
}

impl RegBuf {
    pub(crate) fn new(pd: &Arc<Pd>, slots: usize, slot: usize) -> VResult<RegBuf> {
        let mut buf = vec![0u8; slots * slot].into_boxed_slice();
        // SAFETY: the box is owned by the RegBuf and dropped after the MR.
        let mr = unsafe { Mr::register(pd, buf.as_mut_ptr(), buf.len(), ACCESS_LOCAL)? };
        Ok(RegBuf { mr, buf, slot })
    }
    pub(crate) fn slot(&self, i: usize) -> &[u8] {
        &self.buf[i * self.slot..(i + 1) * self.slot]
    }
    pub(crate) fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot..(i + 1) * self.slot]
    }
    fn sge(&self, i: usize, len: usize) -> ibv_sge {
        ibv_sge {
            addr: self.buf[i * self.slot..].as_ptr() as u64,
            length: len as u32,
            lkey: self.mr.lkey(),
        }
    }
    pub(crate) fn slot_size(&self) -> usize {
        self.slot
    }
}

pub(crate) struct Qp {
    id: Arc<CmId>,
    raw: *mut ibv_qp,
    _pd: Arc<Pd>,
    pub(crate) max_inline: u32,
}

// SAFETY: see Pd (posting from several threads is allowed by libibverbs; we post from one).
unsafe impl Send for Qp {}

impl Qp {
    /// Create the RC QP of `id` on `cq` (send and receive).
    pub(crate) fn new(
        id: Arc<CmId>,
        pd: &Arc<Pd>,
        cq: &Cq,
        send_wr: u32,
        recv_wr: u32,
    ) -> VResult<Qp> {
        // SAFETY: zeroed is valid for this plain struct; fields set below.
        let mut attr: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = cq.raw;
        attr.recv_cq = cq.raw;
        attr.qp_type = ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap = ibv_qp_cap {
            max_send_wr: send_wr,
            max_recv_wr: recv_wr,
            max_send_sge: 1,
            max_recv_sge: 1,
            max_inline_data: 64,
        };
        // SAFETY: live id, pd and cq; attr lives for the call.
        check("rdma_create_qp", unsafe {
            rdma_create_qp(id.raw, pd.raw, &mut attr)
        })?;
        // SAFETY: rdma_create_qp succeeded, so id->qp is set.
        let raw = unsafe { (*id.raw).qp };
        Ok(Qp {
            id,
            raw,
            _pd: pd.clone(),
            max_inline: attr.cap.max_inline_data,
        })
    }

    pub(crate) fn id(&self) -> &Arc<CmId> {
        &self.id
    }

    /// Post a receive of slot `i` of `buf`.
    pub(crate) fn post_recv(&self, wr_id: u64, buf: &RegBuf, i: usize) -> VResult<()> {
        let mut sge = buf.sge(i, buf.slot_size());
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: live QP; the slot is registered memory owned by the connection, which keeps
        // it (and does not touch it) until the completion for wr_id arrives or the QP is gone.
        check("ibv_post_recv", unsafe {
            ibv_post_recv(self.raw, &mut wr, &mut bad)
        })
    }

    /// Post every work request of `batch` with one call (one doorbell: on rxe one system
    /// call instead of one per message), in order, then empty it. On an error some of them
    /// may have been posted; the caller treats the connection as failed.
    pub(crate) fn post_batch(&self, batch: &mut SendBatch) -> VResult<()> {
        let n = batch.wrs.len();
        if n == 0 {
            return Ok(());
        }
        // Link the list now: the vectors do not grow (or move) until the call returns.
        let sges = batch.sges.as_mut_ptr();
        let wrs = batch.wrs.as_mut_ptr();
        for k in 0..n {
            // SAFETY: k < n = len of both vectors (one SGE per WR).
            unsafe {
                (*wrs.add(k)).sg_list = sges.add(k);
                (*wrs.add(k)).next = if k + 1 < n {
                    wrs.add(k + 1)
                } else {
                    ptr::null_mut()
                };
            }
        }
        let mut bad = ptr::null_mut();
        // SAFETY: live QP; the WR list and its SGEs live for the call (the provider copies
        // them); what they point at is the contract of SendBatch's methods.
        let r = check("ibv_post_send", unsafe {
            ibv_post_send(self.raw, wrs, &mut bad)
        });
        batch.wrs.clear();
        batch.sges.clear();
        r
    }
}

/// Send-queue work requests gathered while the link handles a burst, posted together by
/// [`Qp::post_batch`].
pub(crate) struct SendBatch {
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    max_inline: u32,
}

// SAFETY: only plain data and pointers into registered memory the connection owns; built
// and posted on the connection's thread.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub(crate) fn new(qp: &Qp, capacity: usize) -> SendBatch {
        SendBatch {
            wrs: Vec::with_capacity(capacity),
            sges: Vec::with_capacity(capacity),
            max_inline: qp.max_inline,
        }
    }

    /// Add a signaled SEND of `len` bytes of slot `i` of `buf`. The slot must stay reserved
    /// (and unchanged) until its completion.
    pub(crate) fn send(&mut self, wr_id: u64, buf: &RegBuf, i: usize, len: usize) {
        let mut wr = send_wr(
            wr_id,
            ibv_wr_opcode::IBV_WR_SEND,
            ibv_send_flags::IBV_SEND_SIGNALED.0,
        );
        if len <= self.max_inline as usize {
            wr.send_flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        self.wrs.push(wr);
        self.sges.push(buf.sge(i, len));
    }

    /// Add an unsignaled RDMA WRITE of `local_addr..+len` to `remote_addr`. Follow it with
    /// a signaled SEND (the record notification): RC ordering makes that SEND arrive after
    /// the written bytes are placed, and its completion says the WRITE is done.
    ///
    /// # Safety
    /// `local_addr..+len` must be inside memory registered as `lkey` and stay unchanged and
    /// mapped until the following SEND's completion (or the QP's destruction).
    pub(crate) unsafe fn write(
        &mut self,
        wr_id: u64,
        local: (u64, u32, u32),
        remote_addr: u64,
        rkey: u32,
    ) {
        let (addr, length, lkey) = local;
        let mut wr = send_wr(wr_id, ibv_wr_opcode::IBV_WR_RDMA_WRITE, 0);
        wr.wr.rdma = rdma_t { remote_addr, rkey };
        self.wrs.push(wr);
        self.sges.push(ibv_sge { addr, length, lkey });
    }
}

fn send_wr(wr_id: u64, opcode: u32, flags: u32) -> ibv_send_wr {
    // SAFETY: zeroed is a valid ibv_send_wr (null pointers, zero unions); fields set below
    // and the SGE / list links by Qp::post_batch.
    let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
    wr.wr_id = wr_id;
    wr.num_sge = 1;
    wr.opcode = opcode;
    wr.send_flags = flags;
    wr
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: live QP created by rdma_create_qp on this id; destroyed once, before the id
        // (we hold an Arc of it), the PD (Arc) and the CQ/MRs (connection field order).
        unsafe { rdma_destroy_qp(self.id.raw) };
    }
}

/// Names and capabilities of the RDMA devices present (for the README's FLUSH note and tools).
pub(crate) fn list_devices() -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    let mut n = 0;
    // SAFETY: returns an array of n devices or NULL; freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        return out;
    }
    for i in 0..n.max(0) as usize {
        // SAFETY: i < n entries in the list.
        let dev = unsafe { *list.add(i) };
        // SAFETY: live device from the list.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: open/query/close a context of a live device.
        let caps = unsafe {
            let ctx = ibv_open_device(dev);
            if ctx.is_null() {
                None
            } else {
                let mut attr: ibv_device_attr_ex = std::mem::zeroed();
                let rc = ibv_query_device_ex(ctx, ptr::null(), &mut attr);
                ibv_close_device(ctx);
                (rc == 0).then_some(attr.device_cap_flags_ex)
            }
        };
        out.push((name, caps));
    }
    // SAFETY: the list from ibv_get_device_list, freed once.
    unsafe { ibv_free_device_list(list) };
    out
}
