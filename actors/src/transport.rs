//! The sockets under ractor_cluster: connections counted byte for byte (the bytes that crossed
//! the socket, TLS records included), the server's listener, and TLS from `[cluster]`.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use fedbpt::config::Cluster;
use ractor::ActorRef;
use ractor_cluster::{BoxRead, BoxWrite, ClusterBidiStream, NodeServerMessage};
use serde::Serialize;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Bytes sent and received on one connection's socket.
#[derive(Clone, Default)]
pub struct SocketCounters {
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
}

/// What [`SocketCounters`] counted, for a process's stats file.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SocketBytes {
    pub sent: u64,
    pub received: u64,
}

impl SocketCounters {
    pub fn bytes(&self) -> SocketBytes {
        SocketBytes {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
        }
    }
}

/// A stream that counts what passes through it.
pub struct Counted<S> {
    inner: S,
    counters: SocketCounters,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let n = (buf.filled().len() - before) as u64;
            self.counters.received.fetch_add(n, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Any connected byte stream, as ractor_cluster takes an external one.
struct Bidi<S> {
    stream: S,
    peer: String,
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> ClusterBidiStream for Bidi<S> {
    fn split(self: Box<Self>) -> (BoxRead, BoxWrite) {
        let (r, w) = tokio::io::split(self.stream);
        (Box::new(r), Box::new(w))
    }

    fn peer_label(&self) -> Option<String> {
        Some(self.peer.clone())
    }
}

/// Connects to `addr` (over TLS when `cluster.tls_ca` is set), counting the socket's bytes.
pub async fn connect(
    addr: &str,
    cluster: &Cluster,
    counters: SocketCounters,
) -> Result<Box<dyn ClusterBidiStream>> {
    let tcp = connect_tcp(addr).await?;
    tcp.set_nodelay(true)?;
    let counted = Counted { inner: tcp, counters };
    let peer = addr.to_string();
    let Some(ca) = &cluster.tls_ca else {
        return Ok(Box::new(Bidi { stream: counted, peer }));
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca)? {
        roots.add(cert).with_context(|| format!("{}: not a CA certificate", ca.display()))?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = match &cluster.tls_server_name {
        Some(name) => name.clone(),
        None => addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']).to_string(),
    };
    let name = ServerName::try_from(host.clone())
        .map_err(|e| anyhow!("cluster.tls_server_name: `{host}` is no server name: {e}"))?;
    let handshake = TlsConnector::from(Arc::new(config)).connect(name, counted);
    let tls = tokio::time::timeout(HANDSHAKE_PATIENCE, handshake)
        .await
        .map_err(|_| {
            anyhow!("no TLS handshake from {addr} within {} s", HANDSHAKE_PATIENCE.as_secs())
        })?
        .with_context(|| format!("TLS handshake with {addr}"))?;
    Ok(Box::new(Bidi { stream: tls, peer }))
}

/// How long a client process keeps trying a server that refuses connections (not started yet).
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

async fn connect_tcp(addr: &str) -> Result<TcpStream> {
    let started = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && started.elapsed() < CONNECT_PATIENCE =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("connecting to {addr} (tried for {} s)", started.elapsed().as_secs())
                })
            }
        }
    }
}

/// How long a peer has to finish the TLS handshake (a silent peer must not hold the port).
const HANDSHAKE_PATIENCE: Duration = Duration::from_secs(10);

/// The server's listener: accepts connections on `listen` itself, each in its own task (a
/// peer that stalls its TLS handshake holds up only itself; ractor_cluster's own listener
/// handshakes inside its accept loop), counts their bytes, and hands them to the node.
pub async fn listen(
    listen: SocketAddr,
    cluster: &Cluster,
    node: ActorRef<NodeServerMessage>,
    counters: SocketCounters,
) -> Result<tokio::task::JoinHandle<()>> {
    let tls = acceptor(cluster)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    Ok(tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tls, node, counters) = (tls.clone(), node.clone(), counters.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let counted = Counted { inner: tcp, counters };
                let peer = peer.to_string();
                let stream: Box<dyn ClusterBidiStream> = match tls {
                    None => Box::new(Bidi { stream: counted, peer: peer.clone() }),
                    Some(acceptor) => {
                        match tokio::time::timeout(HANDSHAKE_PATIENCE, acceptor.accept(counted))
                            .await
                        {
                            Ok(Ok(stream)) => Box::new(Bidi { stream, peer: peer.clone() }),
                            Ok(Err(e)) => {
                                tracing::warn!("peer {peer}: TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                tracing::warn!(
                                    "peer {peer}: no TLS handshake within {} s",
                                    HANDSHAKE_PATIENCE.as_secs()
                                );
                                return;
                            }
                        }
                    }
                };
                let opened =
                    NodeServerMessage::ConnectionOpenedExternal { stream, is_server: true };
                if node.cast(opened).is_err() {
                    tracing::warn!("peer {peer}: the node is gone");
                }
            });
        }
    }))
}

/// The server's TLS acceptor when `cluster.tls_cert` and `tls_key` are set.
fn acceptor(cluster: &Cluster) -> Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&cluster.tls_cert, &cluster.tls_key) else {
        return Ok(None);
    };
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("cluster.tls_key: {}: {e}", key.display()))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow!("cluster.tls_cert / tls_key: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// The crypto of both ends, named: other dependencies enable rustls's other provider too, and
/// then rustls cannot pick a default.
fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_that_are_missing_or_hold_no_certificate_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let cluster = |cert: &Path| Cluster {
            tls_cert: Some(cert.to_path_buf()),
            tls_key: Some(cert.to_path_buf()),
            ..Cluster::default()
        };
        let e = acceptor(&cluster(&missing)).err().unwrap().to_string();
        assert!(e.contains("nowhere.pem"), "{e}");
        let e = acceptor(&cluster(&junk)).err().unwrap().to_string();
        assert!(e.contains("junk.pem") && e.contains("no certificate"), "{e}");
        assert!(acceptor(&Cluster::default()).unwrap().is_none(), "no TLS unless asked");
    }
}
