//! Opening an upstream connection: connect (and the TLS handshake, for a TLS upstream)
//! within the connect timeout, then the Redis handshake (`HELLO <proto> [AUTH user pass]`,
//! `SELECT`, `CLIENT SETNAME`), and one-off round trips on a connection that carries nothing
//! else.
//!
//! Redis can refuse a connection with a reply rather than a closed socket: `NOAUTH`,
//! `WRONGPASS` (the identity), `max number of clients reached` (this one connection).
//! Those come back as typed errors carrying Redis's words, so the caller can tell a server
//! that answered "no" from one that did not answer at all.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use super::tls::UpstreamStream;
use super::{ServerInfo, UpstreamCtx};
use crate::auth::Credentials;
use crate::error::{ConnectFailure, UpstreamError};
use crate::resp::{ErrorCode, Proto, ReplyScanner, encode_command, is_error_reply};

/// What a new connection is set up with before it carries client traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Setup {
    pub proto: Proto,
    pub credentials: Option<Arc<Credentials>>,
    pub db: u32,
    pub client_name: Option<Bytes>,
}

impl Setup {
    pub fn new(proto: Proto, credentials: Option<Arc<Credentials>>) -> Setup {
        Setup {
            proto,
            credentials,
            db: 0,
            client_name: None,
        }
    }
}

/// Connects, with TLS for a TLS upstream, within the connect timeout. A TLS upstream is
/// never reached in plain text: a failed handshake is a failed connect.
pub async fn connect(ctx: &UpstreamCtx) -> Result<UpstreamStream, UpstreamError> {
    let deadline = tokio::time::Instant::now() + ctx.connect_timeout;
    let timed_out = |what: &str| UpstreamError::Connect {
        upstream: ctx.name.clone(),
        failure: ConnectFailure::Timeout,
        reason: format!(
            "{what} timed out after {} ms",
            ctx.connect_timeout.as_millis()
        )
        .into(),
    };
    // Resolved apart from connecting, so that a name that does not resolve is told from a
    // server that is down: it is a configuration error, and degraded reads say so.
    let unresolved = |why: String| {
        ctx.set_unresolved(Some(why.clone()));
        UpstreamError::Connect {
            upstream: ctx.name.clone(),
            failure: ConnectFailure::Other,
            reason: why.into(),
        }
    };
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout_at(deadline, tokio::net::lookup_host(ctx.addr.as_str())).await {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Err(unresolved(format!("{} does not resolve: {e}", ctx.addr))),
            Err(_) => return Err(timed_out("name resolution")),
        };
    if addrs.is_empty() {
        return Err(unresolved(format!("{} resolves to no address", ctx.addr)));
    }
    ctx.set_unresolved(None);
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(&addrs[..])).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(UpstreamError::connect(&ctx.name, &e)),
        Err(_) => return Err(timed_out("connect")),
    };
    // Connecting to a local port nobody listens on can, by TCP's simultaneous open, connect
    // the socket to itself when the kernel picks that same port as its source: it would then
    // hold the port the real server needs. Nobody is there: treat it as refused.
    if let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr())
        && local == peer
    {
        return Err(UpstreamError::Connect {
            upstream: ctx.name.clone(),
            failure: ConnectFailure::Refused,
            reason: "connection refused (connected to itself)".into(),
        });
    }
    let _ = stream.set_nodelay(true);
    let Some(tls) = &ctx.tls else {
        return Ok(UpstreamStream::Plain(stream));
    };
    match tokio::time::timeout_at(deadline, super::tls::handshake(stream, tls)).await {
        Ok(Ok(s)) => {
            ctx.set_tls_refused(None);
            Ok(s)
        }
        Ok(Err(e)) => {
            if let Some(refused) = e
                .get_ref()
                .and_then(|i| i.downcast_ref::<super::tls::Refused>())
            {
                ctx.set_tls_refused(Some(refused.0.clone()));
            }
            Err(UpstreamError::connect(&ctx.name, &e))
        }
        // A plain-text server waits for the end of a command line that never comes.
        Err(_) => Err(timed_out(
            "TLS handshake (is the server speaking TLS on this port?)",
        )),
    }
}

/// An I/O error on an upstream connection; TLS alerts that arrive after the handshake
/// (TLS 1.3 servers check client certificates then) are explained as handshake failures.
fn io_error(ctx: &UpstreamCtx, e: std::io::Error) -> UpstreamError {
    match ctx
        .tls
        .as_ref()
        .and_then(|tls| super::tls::explain(&e, tls))
    {
        Some(reason) => UpstreamError::unavailable(&ctx.name, reason),
        None => UpstreamError::unavailable(&ctx.name, e),
    }
}

/// Sends one frame on a connection that carries nothing else and reads its reply within
/// `timeout`. Handshake steps pass the connect timeout (setting a connection up is part of
/// connecting: a client waiting on a fresh connection must not wait a command timeout on
/// top of it); commands pass the command timeout.
pub async fn roundtrip(
    ctx: &UpstreamCtx,
    stream: &mut UpstreamStream,
    frame: &[u8],
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let fut = async {
        stream
            .write_all(frame)
            .await
            .map_err(|e| io_error(ctx, e))?;
        stream.flush().await.map_err(|e| io_error(ctx, e))?;
        let mut scanner = ReplyScanner::new();
        loop {
            match scanner.scan(buf, ctx.max_reply_depth) {
                Ok(Some(n)) => return Ok(buf.split_to(n).freeze()),
                Ok(None) => {}
                Err(e) => {
                    return Err(UpstreamError::Malformed {
                        upstream: ctx.name.clone(),
                        reason: e.0.into(),
                    });
                }
            }
            buf.reserve(4096);
            match stream.read_buf(buf).await {
                Ok(0) => {
                    return Err(UpstreamError::Closed {
                        upstream: ctx.name.clone(),
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(io_error(ctx, e)),
            }
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(UpstreamError::Timeout {
            upstream: ctx.name.clone(),
            timeout,
        }),
    }
}

/// Connects and runs the handshake: `HELLO <proto> [AUTH user pass]`, then `SELECT` and
/// `CLIENT SETNAME` when the setup asks for them.
pub async fn open(ctx: &UpstreamCtx, setup: &Setup) -> Result<UpstreamStream, UpstreamError> {
    let mut stream = connect(ctx).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let mut hello: Vec<Bytes> = vec![
        Bytes::from_static(b"HELLO"),
        Bytes::from_static(match setup.proto {
            Proto::Resp2 => b"2",
            Proto::Resp3 => b"3",
        }),
    ];
    if let Some(c) = &setup.credentials {
        hello.push(Bytes::from_static(b"AUTH"));
        hello.push(Bytes::from(c.user().to_owned()));
        hello.push(Bytes::from(c.password.clone()));
    }
    let reply = roundtrip(
        ctx,
        &mut stream,
        &encode_command(&hello),
        &mut buf,
        ctx.connect_timeout,
    )
    .await?;
    if is_error_reply(&reply) {
        return Err(refusal(ctx, setup, &reply));
    }
    if setup.credentials.is_some() {
        ctx.auth_warned.store(false, Ordering::Relaxed);
    } else {
        ctx.anonymous_denied.store(false, Ordering::Relaxed);
    }
    if let Some(info) = ServerInfo::parse(&reply) {
        ctx.remember_server_info(info);
    }
    if setup.db != 0 {
        let select = encode_command(&[b"SELECT".as_slice(), setup.db.to_string().as_bytes()]);
        let reply = roundtrip(ctx, &mut stream, &select, &mut buf, ctx.connect_timeout).await?;
        if is_error_reply(&reply) {
            return Err(UpstreamError::Refused {
                upstream: ctx.name.clone(),
                reply: text_of(&reply),
            });
        }
    }
    if let Some(name) = &setup.client_name {
        let cmd = encode_command(&[b"CLIENT".as_slice(), b"SETNAME", name]);
        roundtrip(ctx, &mut stream, &cmd, &mut buf, ctx.connect_timeout).await?;
    }
    Ok(stream)
}

fn text_of(reply: &[u8]) -> Arc<str> {
    String::from_utf8_lossy(reply.get(1..).unwrap_or_default())
        .trim_end()
        .into()
}

/// The error for a handshake Redis answered with an error reply.
fn refusal(ctx: &UpstreamCtx, setup: &Setup, reply: &[u8]) -> UpstreamError {
    let text = text_of(reply);
    let code = ErrorCode::of(reply);
    if code.is_auth() {
        ctx.metrics.auth_errors.inc();
        match &setup.credentials {
            // Without credentials this is the client's job (it will AUTH): Redis requires
            // authentication, which degraded mode must honour too.
            None => ctx.anonymous_denied.store(true, Ordering::Relaxed),
            // With them it is a misconfiguration that waiting will not fix: say so loudly,
            // once per episode.
            Some(c) => {
                if !ctx.auth_warned.swap(true, Ordering::Relaxed) {
                    warn!(upstream = %ctx.name, user = %c.user(), reply = %text, "upstream rejected the credentials redfuse connects with");
                }
            }
        }
        return UpstreamError::Auth {
            upstream: ctx.name.clone(),
            reply: text,
        };
    }
    match code {
        // The server answered: it is up, but will not take this connection (max clients)
        // or is not ready (LOADING ...).
        ErrorCode::MaxClients => UpstreamError::Refused {
            upstream: ctx.name.clone(),
            reply: text,
        },
        _ => UpstreamError::unavailable(&ctx.name, format!("handshake failed: {text}")),
    }
}
