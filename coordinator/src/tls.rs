//! TLS on every port, from one cluster CA.
//!
//! With `[tls]` set (a CA certificate, this coordinator's certificate and
//! key, PEM files that `talon cert` makes):
//! - the API port (admin, agent and inference gRPC) and the HTTP gateway
//!   speak TLS with this coordinator's certificate; callers authenticate
//!   with API keys on top;
//! - the Raft port (`raft_listen`, its own listener) demands mutual TLS: the
//!   caller must present a certificate of the cluster CA whose common name
//!   marks it as a coordinator (`talon-coordinator-…`); an agent's or a
//!   client's certificate of the same CA is refused;
//! - coordinators call each other (Raft, forwarded admin calls, bootstrap
//!   checks) with their own certificate and the CA.
//!
//! rustls with the ring provider: no OpenSSL at build or run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Prefix of the common name of every coordinator certificate.
pub const COORDINATOR_CN_PREFIX: &str = "talon-coordinator";

/// The PEM files of one coordinator.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

impl TlsMaterial {
    /// Reads and checks the three files: each must hold what it says.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, String> {
        let m = TlsMaterial {
            ca_pem: read(ca, "tls.ca_file")?,
            cert_pem: read(cert, "tls.cert_file")?,
            key_pem: read(key, "tls.key_file")?,
        };
        let certs = |bytes: &[u8], field: &str, path: &PathBuf| -> Result<usize, String> {
            let n = rustls_pemfile::certs(&mut &bytes[..])
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{field} {}: {e}", path.display()))?
                .len();
            if n == 0 {
                return Err(format!(
                    "{field} {} holds no PEM certificate",
                    path.display()
                ));
            }
            Ok(n)
        };
        certs(&m.ca_pem, "tls.ca_file", &ca.to_path_buf())?;
        certs(&m.cert_pem, "tls.cert_file", &cert.to_path_buf())?;
        match rustls_pemfile::private_key(&mut &m.key_pem[..]) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(format!(
                    "tls.key_file {} holds no PEM private key",
                    key.display()
                ))
            }
            Err(e) => return Err(format!("tls.key_file {}: {e}", key.display())),
        }
        m.acceptor()
            .map_err(|e| format!("tls: the certificate and key do not go together: {e}"))?;
        Ok(m)
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// The API port: server TLS, no client certificate (keys authenticate).
    pub fn api_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity())
    }

    /// The Raft port: a client certificate of the cluster CA is required.
    pub fn raft_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca())
    }

    /// Calls to other coordinators: the CA, and this coordinator's
    /// certificate for the Raft port's mutual TLS.
    pub fn peer_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
    }

    /// The HTTP gateway's TLS acceptor.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        let certs = rustls_pemfile::certs(&mut &self.cert_pem[..])
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = rustls_pemfile::private_key(&mut &self.key_pem[..])
            .map_err(|e| e.to_string())?
            .ok_or("no private key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// The URL scheme for calls to a coordinator.
pub fn scheme(tls: Option<&TlsMaterial>) -> &'static str {
    if tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// An endpoint for a call to another coordinator at `addr`.
pub fn peer_endpoint(
    addr: &str,
    tls: Option<&TlsMaterial>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("{}://{addr}", scheme(tls)))?;
    match tls {
        Some(m) => endpoint.tls_config(m.peer_client()),
        None => Ok(endpoint),
    }
}

/// The common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// Whether the first certificate a TLS peer presented is a coordinator's.
/// (The chain itself was verified against the CA by rustls.)
pub fn is_coordinator(certs: &[rustls::pki_types::CertificateDer<'_>]) -> bool {
    certs
        .first()
        .and_then(|c| common_name(c))
        .is_some_and(|cn| cn.starts_with(COORDINATOR_CN_PREFIX))
}

/// The HTTP gateway's listener with TLS: TCP connections are accepted at
/// once and their handshakes run in their own tasks (a slow client cannot
/// hold up others); only finished handshakes are handed to the server.
pub struct TlsListener {
    addr: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
}

impl TlsListener {
    pub fn new(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> TlsListener {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    )
                    .await;
                    match handshake {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        TlsListener { addr, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept task ended (it never does while the listener is
            // open): park, as a listener with no more connections would.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}
