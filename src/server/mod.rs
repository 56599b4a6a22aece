//! Sockets: the accept loop and one task per connection. A connection task owns its socket, its
//! framing state and its write buffer; it turns frames into engine calls, writes the engine's
//! answers, and forwards packets other connections produced for it, coalescing writes so one
//! syscall carries many packets.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

mod admission;
mod read_gate;

pub use admission::refuse_while_recovering;
use admission::{handshake, refuse_by_access, refuse_while_draining};
use read_gate::ReadGate;

use crate::access::{Access, AdminAccess, Permissions};
use crate::admin::{self, AfterAdmin, Listing};
use crate::codec::{put_response, CodecError, Frame, GearmanCodec, PacketType, HEADER_LEN};
use crate::engine::{put_error, ConnId, Engine};
use crate::protocol::{ArgLimits, ErrorCode, ProtocolError, Request, Submit};

/// Connection-level settings (see `config/default.toml`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_packet_size: usize,
    pub max_admin_line: usize,
    pub max_connections: usize,
    /// Packets other connections may queue for one connection before it is closed as too slow.
    pub outbound_queue: usize,
    /// Time a started frame may take to arrive completely (slow-drip protection).
    pub frame_timeout: Duration,
    pub limits: ArgLimits,
    pub admin_networks: Vec<IpNet>,
    /// Networks allowed to send read-only admin commands (`server.admin_read_networks`).
    pub admin_read_networks: Vec<IpNet>,
    /// Unsent output above which a connection's requests are not read until it drains
    /// (`server.max_unsent_bytes`).
    pub max_unsent_bytes: usize,
    /// Time a connection's turn may spend on requests before the task yields its runtime thread
    /// (`server.turn_budget_us`).
    pub turn_budget: Duration,
    /// How long a closing connection may take to write what it still owes its peer.
    pub shutdown_timeout: Duration,
    /// TCP keepalive on accepted connections (`server.keepalive*`), if on.
    pub keepalive: Option<crate::net::Keepalive>,
    /// Access rules (`[[access.rules]]`); none = everyone may do everything.
    pub access: Arc<Access>,
    /// Time a TLS client has to complete its handshake.
    pub tls_handshake_timeout: Duration,
}

/// A listening socket and whether it speaks TLS.
pub struct Listener {
    pub socket: TcpListener,
    pub tls: Option<Arc<crate::tls::Tls>>,
}

impl Listener {
    /// A plain (cleartext) listener.
    pub fn plain(socket: TcpListener) -> Listener {
        Listener { socket, tls: None }
    }
}

/// What connections use beside the engine: the result cache (answers cached foreground submits
/// before they reach the engine) and the dead-letter store (admin `show dead`). `None` in
/// servers and tests built without them.
#[derive(Debug, Clone, Default)]
pub struct Services {
    pub cache: Option<Arc<crate::cache::Cache>>,
    pub dead_letters: Option<Arc<crate::dead_letters::DeadLetters>>,
    /// Where the admin command `takeover` goes (with persistence only).
    pub takeover: Option<crate::persist::on_request::TakeoverRequests>,
}

/// The two stages of stopping, shared by the accept loop, every connection and the admin
/// `shutdown` command.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Graceful (SIGTERM, Ctrl-C, `shutdown graceful`): stop accepting connections and jobs,
    /// hand out no more work, and let running jobs finish and their results reach their
    /// clients, up to `server.shutdown_timeout_ms`.
    pub drain: CancellationToken,
    /// Immediate (a second signal, `shutdown`, or the drain's deadline): close every
    /// connection once it has written what it already owes its peer.
    pub now: CancellationToken,
    /// When the whole stop must be over: set once, when the drain begins.
    deadline: Arc<OnceLock<tokio::time::Instant>>,
}

impl Shutdown {
    /// A stop that begins gracefully when `drain` is cancelled.
    pub fn on(drain: CancellationToken) -> Shutdown {
        Shutdown {
            drain,
            ..Default::default()
        }
    }

    /// Starts a graceful shutdown.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    /// Stops at once (after a drain, or instead of one).
    pub fn now(&self) {
        self.drain.cancel();
        self.now.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// How long a closing connection may still spend writing what it owes: until the stop's
    /// deadline (at least a moment, so results that just arrived go out), or `timeout` when
    /// the server is not stopping.
    fn flush_deadline(&self, timeout: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        match self.deadline.get() {
            Some(d) => (*d).max(now + Duration::from_millis(100)),
            None => now + timeout,
        }
    }
}

/// Most frames handled before the write buffer is flushed, so one busy peer cannot starve its
/// own replies.
const FRAMES_PER_FLUSH: usize = 256;

/// Serves Gearman on an already-bound listener until `shutdown` drains: then stops accepting
/// (the listener is closed, so clients move on to their next server), waits for running jobs
/// to finish, up to `cfg.shutdown_timeout`, closes connections after their pending writes, and
/// returns.
pub async fn run(
    listener: TcpListener,
    engine: Engine,
    cfg: Arc<ServerConfig>,
    services: Services,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    run_listeners(
        vec![Listener::plain(listener)],
        engine,
        cfg,
        services,
        shutdown,
    )
    .await
}

/// As [`run`], on several listeners at once (TLS and plain side by side); the connection cap
/// is shared.
pub async fn run_listeners(
    listeners: Vec<Listener>,
    engine: Engine,
    cfg: Arc<ServerConfig>,
    services: Services,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    tracker.spawn(engine.clone().run_timers(shutdown.now.clone()));
    let metrics = engine.metrics().clone();
    // Open connections: one permit each (server.max_connections).
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        let accepts = listeners
            .iter()
            .map(|l| Box::pin(async move { (l.tls.clone(), l.socket.accept().await) }));
        let (tls, stream, peer) = tokio::select! {
            _ = shutdown.drain.cancelled() => break,
            // Accepting is cancel-safe: the listeners not chosen lose nothing.
            ((tls, r), _, _) = futures::future::select_all(accepts) => match r {
                Ok((stream, peer)) => (tls, stream, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        metrics.connections_total.inc();
        // The permit lives as long as the connection's task: taken here, before any task runs,
        // so a burst of connects accepted in one go cannot overshoot the cap.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tracing::warn!(%peer, max = cfg.max_connections, "refusing connection: server.max_connections reached");
            drop(stream);
            continue;
        };
        metrics.connections.inc();
        let _ = stream.set_nodelay(true);
        if let Some(k) = &cfg.keepalive {
            if let Err(e) = crate::net::apply_keepalive(&stream, k) {
                tracing::warn!(%peer, error = %e, "cannot set TCP keepalive (server.keepalive*)");
            }
        }
        let (engine, cfg, shutdown) = (engine.clone(), cfg.clone(), shutdown.clone());
        let services = services.clone();
        tracker.spawn(async move {
            match tls {
                None => {
                    let perms = cfg.access.permissions(None, peer.ip());
                    Connection::new(stream, peer, perms, engine, cfg, services, shutdown)
                        .serve()
                        .await
                }
                Some(tls) => {
                    if let Some((stream, perms)) =
                        handshake(&tls, stream, peer, &engine, &cfg).await
                    {
                        Connection::new(stream, peer, perms, engine, cfg, services, shutdown)
                            .serve()
                            .await
                    } else {
                        engine.metrics().connections.dec();
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listeners);
    let span = tracing::info_span!(
        "gearhouse.shutdown",
        graceful = !shutdown.now.is_cancelled()
    );
    drain(&engine, &shutdown, cfg.shutdown_timeout)
        .instrument(span)
        .await;
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Waits until no job is running or `timeout` has passed (or an immediate stop), then stops
/// every connection.
async fn drain(engine: &Engine, shutdown: &Shutdown, timeout: Duration) {
    let deadline = *shutdown
        .deadline
        .get_or_init(|| tokio::time::Instant::now() + timeout);
    let running = || -> u32 { engine.function_stats().iter().map(|f| f.running).sum() };
    let at_start = running();
    if at_start > 0 && !shutdown.now.is_cancelled() {
        tracing::info!(
            running = at_start,
            timeout_ms = timeout.as_millis() as u64,
            "draining: waiting for running jobs to finish (server.shutdown_timeout_ms)"
        );
    }
    loop {
        let left = running();
        if left == 0 || shutdown.now.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = shutdown.now.cancelled() => break,
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(running = left, "shutdown deadline reached with jobs still running: they run again after a restart (durable) or are lost (in memory)");
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    shutdown.now();
}

struct Connection<S> {
    id: ConnId,
    peer: SocketAddr,
    engine: Engine,
    cfg: Arc<ServerConfig>,
    framed: Framed<S, GearmanCodec>,
    /// Every read of `framed` goes through it: skips the polls that cannot find news.
    gate: ReadGate,
    /// What the peer may do (access rules).
    perms: Arc<Permissions>,
    /// In `server.admin_read_networks` (or `admin_networks`): may use read-only admin commands.
    may_read_admin: bool,
    /// A listing being written a page at a time.
    listing: Option<Listing>,
    rx: mpsc::Receiver<Bytes>,
    kill: CancellationToken,
    shutdown: Shutdown,
    is_admin: bool,
    services: Services,
}

/// Why a connection loop ended.
enum Close {
    Peer,
    Killed,
    Framing(CodecError),
    Timeout,
    Shutdown,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn new(
        stream: S,
        peer: SocketAddr,
        perms: Arc<Permissions>,
        engine: Engine,
        cfg: Arc<ServerConfig>,
        services: Services,
        shutdown: Shutdown,
    ) -> Self {
        let kill = shutdown.now.child_token();
        let (tx, rx) = mpsc::channel(cfg.outbound_queue.max(1));
        let id = engine.connect(peer, tx, kill.clone());
        let codec = GearmanCodec::new(cfg.max_packet_size, cfg.max_admin_line);
        let is_admin = admin::is_admin(peer.ip(), &cfg.admin_networks);
        let may_read_admin = is_admin || admin::is_admin(peer.ip(), &cfg.admin_read_networks);
        Connection {
            id,
            peer,
            engine,
            cfg,
            framed: Framed::with_capacity(stream, codec, 16 * 1024),
            gate: ReadGate::new(),
            perms,
            may_read_admin,
            listing: None,
            rx,
            kill,
            shutdown,
            is_admin,
            services,
        }
    }

    async fn serve(mut self) {
        let metrics = self.engine.metrics().clone();
        tracing::debug!(conn = self.id, peer = %self.peer, "connected");
        let shutdown = self.shutdown.now.clone();
        let why = self.run(&shutdown).await;
        match &why {
            Close::Framing(e) => {
                metrics.protocol_errors.with_label_values(&[e.kind()]).inc();
                if !matches!(e, CodecError::Io(_)) {
                    tracing::info!(conn = self.id, peer = %self.peer, error = %e, "closing connection: bad input");
                    let mut b = BytesMut::new();
                    put_error(
                        &mut b,
                        &ProtocolError::new(ErrorCode::from(e), e.to_string()),
                    );
                    let _ = self.framed.send(b.freeze()).await;
                }
            }
            Close::Timeout => {
                metrics
                    .protocol_errors
                    .with_label_values(&["frame_timeout"])
                    .inc();
                tracing::info!(conn = self.id, peer = %self.peer, "closing connection: frame not completed within server.frame_timeout_ms");
            }
            Close::Shutdown => {
                // Results and wake-ups other connections already produced for this peer are
                // replies it is owed: they go out with the rest of the buffer.
                self.rx.close();
                while let Ok(p) = self.rx.try_recv() {
                    self.push_out(p);
                }
            }
            Close::Killed | Close::Peer => {}
        }
        // Whatever is already buffered for the peer still goes out, unless the peer was closed
        // for not reading.
        if !matches!(why, Close::Killed) {
            let until = self.shutdown.flush_deadline(self.cfg.shutdown_timeout);
            let _ = tokio::time::timeout_at(until, self.framed.flush()).await;
        }
        self.engine.disconnect(self.id);
        metrics.connections.dec();
        tracing::debug!(conn = self.id, "disconnected");
    }

    async fn run(&mut self, shutdown: &CancellationToken) -> Close {
        // When the frame now arriving began; `None` while the read buffer is empty or holds
        // only whole frames. A frame not complete `frame_timeout` after it began closes the
        // connection.
        let mut partial_since: Option<tokio::time::Instant> = None;
        loop {
            let frame_timeout = self.cfg.frame_timeout;
            let timeout = async move {
                match partial_since {
                    Some(t) => tokio::time::sleep_until(t + frame_timeout).await,
                    None => std::future::pending().await,
                }
            };
            let started = partial_since.is_some();
            tokio::select! {
                _ = self.kill.cancelled() => {
                    return if shutdown.is_cancelled() { Close::Shutdown } else { Close::Killed };
                }
                read = std::future::poll_fn(|cx| {
                    self.gate.poll(cx, |cx| poll_read(&mut self.framed, started, cx))
                }) => {
                    let frame = match read {
                        Read::Started => {
                            partial_since = Some(tokio::time::Instant::now());
                            continue;
                        }
                        Read::Frame(f) => f,
                        Read::Failed(e) => return Close::Framing(e),
                        Read::Eof => return Close::Peer,
                    };
                    let turn = std::time::Instant::now();
                    if let Some(close) = self.handle(frame).await {
                        return close;
                    }
                    // Handle whatever else is already readable, then write once; but read no
                    // further while a listing is pending or the peer already owes us a lot of
                    // reading (its requests wait in the socket: TCP pushes back on it), or once
                    // the turn has used its time (frames from the buffer cost tokio's
                    // cooperative budget nothing, so without this a peer pipelining costly
                    // requests would hold its runtime thread for seconds).
                    let mut cut = false;
                    for _ in 0..FRAMES_PER_FLUSH {
                        if self.listing.is_some() || self.unsent() >= self.cfg.max_unsent_bytes {
                            break;
                        }
                        match self.gate.now(|cx| self.framed.poll_next_unpin(cx)) {
                            Some(Some(Ok(f))) => {
                                if let Some(close) = self.handle(f).await {
                                    return close;
                                }
                                // The clock is read after each frame only: a turn that
                                // finds nothing more to read reads none.
                                if turn.elapsed() >= self.cfg.turn_budget {
                                    cut = true;
                                    break;
                                }
                            }
                            Some(Some(Err(e))) => return Close::Framing(e),
                            Some(None) => return Close::Peer,
                            None => break,
                        }
                    }
                    // A frame completed: bytes still buffered belong to a newer frame, whose
                    // time starts now.
                    partial_since = self
                        .framed
                        .codec()
                        .is_mid_frame(self.framed.read_buffer())
                        .then(tokio::time::Instant::now);
                    if let Some(close) = self.write_listing(shutdown).await {
                        return close;
                    }
                    self.drain_outbound();
                    if let Some(close) = self.write_out(shutdown).await {
                        return close;
                    }
                    if cut {
                        // The frames left in the read buffer are read at the next turn (the
                        // gate stays open for them), after the other tasks have had theirs.
                        self.engine.metrics().turns_cut.inc();
                        tokio::task::yield_now().await;
                    }
                }
                Some(pkt) = self.rx.recv() => {
                    self.push_out(pkt);
                    self.drain_outbound();
                    if let Some(close) = self.write_out(shutdown).await {
                        return close;
                    }
                }
                _ = timeout => return Close::Timeout,
            }
        }
    }

    /// Flushes the write buffer, but gives up when the connection is killed (its outbound
    /// queue overflowed) or the server shuts down meanwhile: a peer that does not read must not
    /// pin its task in a write where the kill is never seen. Unwritten bytes stay buffered.
    async fn write_out(&mut self, shutdown: &CancellationToken) -> Option<Close> {
        let kill = self.kill.clone();
        tokio::select! {
            biased;
            r = self.flush() => r.err().map(|_| Close::Peer),
            _ = kill.cancelled() => Some(if shutdown.is_cancelled() { Close::Shutdown } else { Close::Killed }),
        }
    }

    /// Bytes written to the buffer and not yet sent.
    fn unsent(&self) -> usize {
        self.framed.write_buffer().len()
    }

    /// Writes a pending listing a page at a time (each page takes the engine lock once, for a
    /// bounded walk), sending whenever the unsent output reaches `server.max_unsent_bytes`.
    async fn write_listing(&mut self, shutdown: &CancellationToken) -> Option<Close> {
        while let Some(mut listing) = self.listing.take() {
            if listing.write_page(&self.engine, self.framed.write_buffer_mut()) {
                self.listing = Some(listing);
            }
            if self.unsent() >= self.cfg.max_unsent_bytes {
                if let Some(close) = self.write_out(shutdown).await {
                    return Some(close);
                }
            }
        }
        None
    }

    fn push_out(&mut self, pkt: Bytes) {
        self.engine.metrics().packets_out.inc();
        self.framed.write_buffer_mut().extend_from_slice(&pkt);
    }

    fn drain_outbound(&mut self) {
        for _ in 0..FRAMES_PER_FLUSH {
            match self.rx.try_recv() {
                Ok(p) => self.push_out(p),
                Err(_) => break,
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let n = self.framed.write_buffer().len();
        if n == 0 {
            return Ok(());
        }
        self.engine.metrics().bytes_out.inc_by(n as u64);
        self.framed.flush().await.map_err(|e| match e {
            CodecError::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
    }

    /// Handles one frame; `Some` ends the connection.
    async fn handle(&mut self, frame: Frame) -> Option<Close> {
        let metrics = self.engine.metrics().clone();
        match frame {
            Frame::Admin(line) => {
                metrics.bytes_in.inc_by(line.len() as u64 + 1);
                if !self.may_read_admin {
                    metrics.access_denied.with_label_values(&["admin"]).inc();
                    self.framed.write_buffer_mut().extend_from_slice(
                        b"ERR PERMISSION_DENIED admin+commands+are+accepted+only+from+server.admin_read_networks\r\n",
                    );
                    return None;
                }
                let out = self.framed.write_buffer_mut();
                let is_admin = match self.perms.admin() {
                    _ if self.perms.is_open() => self.is_admin,
                    AdminAccess::All => true,
                    AdminAccess::Read => false,
                    AdminAccess::None => {
                        metrics.access_denied.with_label_values(&["admin"]).inc();
                        out.extend_from_slice(b"ERR PERMISSION_DENIED admin+commands+are+not+allowed+for+this+connection+(access.rules)\r\n");
                        return None;
                    }
                };
                let (cmd, ok, after) = admin::execute(
                    &self.engine,
                    &line,
                    self.peer,
                    is_admin,
                    self.services.dead_letters.as_deref(),
                    out,
                );
                metrics
                    .admin_commands
                    .with_label_values(&[cmd, if ok { "ok" } else { "error" }])
                    .inc();
                match after {
                    AfterAdmin::Shutdown { graceful: true } => self.shutdown.drain(),
                    AfterAdmin::Shutdown { graceful: false } => self.shutdown.now(),
                    AfterAdmin::List(l) => self.listing = Some(l),
                    AfterAdmin::Takeover(ask) => {
                        // Awaited here: this connection answers nothing else meanwhile (its
                        // later requests wait in order); a kill or a stop leaves the takeover
                        // running in the watcher and closes the connection.
                        let answer = match &self.services.takeover {
                            None => crate::persist::on_request::no_persistence(),
                            Some(t) => tokio::select! {
                                a = t.ask(ask) => a,
                                _ = self.kill.cancelled() => return Some(Close::Killed),
                                _ = self.shutdown.now.cancelled() => return Some(Close::Shutdown),
                            },
                        };
                        self.framed
                            .write_buffer_mut()
                            .extend_from_slice(answer.as_bytes());
                    }
                    AfterAdmin::Continue => {}
                }
                None
            }
            Frame::Packet(p) => {
                metrics.bytes_in.inc_by((HEADER_LEN + p.body.len()) as u64);
                metrics.packet_in(p.kind);
                let req = match Request::parse(&p, &self.cfg.limits) {
                    Ok(r) => r,
                    Err(e) => {
                        metrics
                            .protocol_errors
                            .with_label_values(&[e.code.as_str()])
                            .inc();
                        tracing::debug!(conn = self.id, error = %e, "refused request");
                        put_error(self.framed.write_buffer_mut(), &e);
                        metrics.packets_out.inc();
                        return None;
                    }
                };
                // A request's own answer is at most one packet (JOB_CREATED, JOB_ASSIGN, NO_JOB,
                // NOOP, STATUS_RES, ECHO_RES, OPTION_RES or ERROR): the buffer grew or it did
                // not. Packets from other connections are counted in push_out.
                let before = self.framed.write_buffer().len();
                let mut extra = 0;
                if let Some((cache, s)) = self.dispatch(req) {
                    extra = self.submit_cached(&cache, s).await;
                }
                let answered = self.framed.write_buffer().len() > before;
                metrics.packets_out.inc_by(answered as u64 + extra);
                None
            }
        }
    }

    /// A foreground submit of a cached function: answered from the cache on a hit (JOB_CREATED
    /// and WORK_COMPLETE, no engine, no worker), else submitted to the engine. The connection
    /// awaits the lookup (memcached when the in-memory front misses), so its requests keep
    /// their order. Returns the packets written beyond the one the caller counts.
    async fn submit_cached(&mut self, cache: &crate::cache::Cache, s: Submit) -> u64 {
        match cache.lookup(&s.function, &s.unique).await {
            Some(result) => {
                cache.put_hit(self.framed.write_buffer_mut(), &s, self.peer, &result);
                1
            }
            None => {
                self.engine
                    .submit(self.id, s, self.framed.write_buffer_mut());
                0
            }
        }
    }

    /// Runs one request against the engine, writing its answer. A submit the result cache may
    /// answer is handed back instead (with the cache), for [`Connection::submit_cached`].
    fn dispatch(&mut self, req: Request) -> Option<(Arc<crate::cache::Cache>, Submit)> {
        let id = self.id;
        let engine = &self.engine;
        let draining = self.shutdown.is_draining();
        let out = self.framed.write_buffer_mut();
        if draining && refuse_while_draining(&req, out) {
            return None;
        }
        if !self.perms.is_open() && refuse_by_access(&req, &self.perms, engine, out) {
            return None;
        }
        match req {
            Request::CanDo {
                function,
                timeout_ms,
            } => {
                if let Err(e) = engine.can_do(id, &function, timeout_ms) {
                    put_error(out, &e);
                }
            }
            Request::CantDo { function } => engine.cant_do(id, &function),
            Request::ResetAbilities => engine.reset_abilities(id),
            Request::PreSleep => engine.pre_sleep(id, out),
            Request::Submit(s) => match &self.services.cache {
                Some(c) if c.is_cacheable(&s) => return Some((c.clone(), s)),
                _ => {
                    engine.submit(id, s, out);
                }
            },
            Request::Grab(kind) => engine.grab(id, kind, out),
            Request::Work { kind, handle, body } => engine.work(id, kind, &handle, &body, out),
            Request::GetStatus { handle } => engine.get_status(&handle, out),
            Request::GetStatusUnique { unique } => engine.get_status_unique(&unique, out),
            Request::Echo { data } => put_response(out, PacketType::ECHO_RES, &[&data]),
            Request::SetClientId { id: cid } => engine.set_client_id(id, cid),
            Request::Option { name } => match engine.set_option(id, &name) {
                Ok(()) => put_response(out, PacketType::OPTION_RES, &[&name]),
                Err(e) => put_error(out, &e),
            },
            Request::AllYours => {}
        }
        None
    }
}

/// What reading a connection produced.
enum Read {
    Frame(Frame),
    /// The first bytes of a frame arrived (its time starts).
    Started,
    Failed(CodecError),
    Eof,
}

/// Polls for the next whole frame, and also reports the moment a frame begins to arrive: the
/// codec only yields whole frames, so without this a slow sender's first bytes would go
/// unnoticed until some later wake-up, and `server.frame_timeout_ms` would be honoured only to
/// within a whole extra period.
fn poll_read<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, GearmanCodec>,
    started: bool,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Read> {
    use std::task::Poll;
    match framed.poll_next_unpin(cx) {
        Poll::Ready(Some(Ok(f))) => Poll::Ready(Read::Frame(f)),
        Poll::Ready(Some(Err(e))) => Poll::Ready(Read::Failed(e)),
        Poll::Ready(None) => Poll::Ready(Read::Eof),
        Poll::Pending if !started && framed.codec().is_mid_frame(framed.read_buffer()) => {
            Poll::Ready(Read::Started)
        }
        Poll::Pending => Poll::Pending,
    }
}
