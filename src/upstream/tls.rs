//! TLS to upstreams, with rustls: the stream type every upstream connection uses, and the
//! client configuration built once from `tls_ca_cert_file`, `tls_cert_file` and
//! `tls_key_file`.
//!
//! [`UpstreamStream`] is an enum, not a boxed trait object: the plain TCP path stays what it
//! was (no allocation, no dynamic dispatch, `TcpStream::split` borrowed halves); only a TLS
//! connection boxes its (large) session state once, at connect time.
//!
//! rustls buffers the records it could not write at once, so a write to a TLS stream is
//! only on the wire after `flush`; callers flush after each batch (a no-op for plain TCP).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;
use tokio_rustls::client::TlsStream;

use crate::config::TlsClient;

/// A connection to an upstream: plain TCP or TLS over TCP.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for UpstreamStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamStream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            UpstreamStream::Tls(s) => f.debug_tuple("Tls").field(s.get_ref().0).finish(),
        }
    }
}

impl UpstreamStream {
    /// Borrowed read and write halves, for one task that reads and writes concurrently.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            UpstreamStream::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            UpstreamStream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// Owned halves, for a reader and a writer in different tasks.
    pub fn into_split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        match self {
            UpstreamStream::Plain(s) => {
                let (r, w) = s.into_split();
                (OwnedReadHalf::Plain(r), OwnedWriteHalf::Plain(w))
            }
            UpstreamStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (OwnedReadHalf::Tls(r), OwnedWriteHalf::Tls(w))
            }
        }
    }
}

/// Implements `AsyncRead` for an enum whose variants all implement it.
macro_rules! delegate_read {
    ($ty:ty) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

/// Implements `AsyncWrite` for an enum whose variants all implement it.
macro_rules! delegate_write {
    ($ty:ty) => {
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(UpstreamStream);
delegate_write!(UpstreamStream);

/// Borrowed read half of an [`UpstreamStream`].
pub enum ReadHalf<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

/// Borrowed write half of an [`UpstreamStream`].
pub enum WriteHalf<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

/// Owned read half of an [`UpstreamStream`].
pub enum OwnedReadHalf {
    Plain(tcp::OwnedReadHalf),
    Tls(tokio::io::ReadHalf<Box<TlsStream<TcpStream>>>),
}

/// Owned write half of an [`UpstreamStream`].
pub enum OwnedWriteHalf {
    Plain(tcp::OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<Box<TlsStream<TcpStream>>>),
}

delegate_read!(ReadHalf<'_>);
delegate_write!(WriteHalf<'_>);
delegate_read!(OwnedReadHalf);
delegate_write!(OwnedWriteHalf);

/// Runs the TLS handshake on a connected socket. The error says what to check.
pub async fn handshake(tcp: TcpStream, tls: &TlsClient) -> io::Result<UpstreamStream> {
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    match connector.connect(tls.server_name.clone(), tcp).await {
        Ok(s) => Ok(UpstreamStream::Tls(Box::new(s))),
        Err(e) => Err(match explain(&e, tls) {
            Some(reason) => io::Error::new(e.kind(), Refused(reason)),
            None => io::Error::new(
                e.kind(),
                format!(
                    "TLS handshake with {} failed: {e}",
                    tls.server_name.to_str()
                ),
            ),
        }),
    }
}

/// The server (or redfuse's own trust settings) refused the handshake: a configuration
/// problem, not an outage, which degraded replies name instead of "circuit open". Carried
/// inside the `io::Error` that [`handshake`] returns; its text is the reason.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// A TLS failure in words that say what to check; `None` when `e` is not one.
pub fn explain(e: &io::Error, tls: &TlsClient) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let hint = match inner {
        rustls::Error::InvalidCertificate(_) => {
            " (the server's certificate is not trusted: check tls_ca_cert_file and tls_server_name)"
        }
        rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            " (the server requires a client certificate: set tls_cert_file and tls_key_file)"
        }
        rustls::Error::AlertReceived(_) => {
            " (the server refused the handshake: check tls_cert_file, tls_key_file and the server's tls settings)"
        }
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            " (is the server speaking TLS on this port?)"
        }
        _ => "",
    };
    Some(format!(
        "TLS handshake with {} failed: {inner}{hint}",
        tls.server_name.to_str()
    ))
}

/// The client configuration shared by every TLS upstream: trusted roots (the CA bundle, or
/// the system's roots without one) and the optional client certificate. The error names
/// the field at fault.
pub fn client_config(
    ca_cert_file: Option<&Path>,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, (&'static str, String)> {
    let mut roots = RootCertStore::empty();
    match ca_cert_file {
        Some(path) => {
            let certs = read_certs(path).map_err(|m| ("tls_ca_cert_file", m))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    (
                        "tls_ca_cert_file",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err((
                    "tls_ca_cert_file",
                    "no system CA certificates were found; set tls_ca_cert_file to the CA bundle that signed the server's certificate".to_owned(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls_ca_cert_file", e.to_string()))?
        .with_root_certificates(roots);
    let config = match (cert_file, key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(|m| ("tls_cert_file", m))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                (
                    "tls_key_file",
                    format!("{}: no usable private key: {e}", key.display()),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ("tls_key_file", format!("{}: {e}", key.display())))?
        }
        (Some(_), None) => {
            return Err(("tls_key_file", "tls_cert_file needs tls_key_file".into()));
        }
        (None, Some(_)) => {
            return Err(("tls_cert_file", "tls_key_file needs tls_cert_file".into()));
        }
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}
