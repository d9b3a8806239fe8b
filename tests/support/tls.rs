//! TLS test fixtures: certificates made with rcgen, and a `redis-server` that listens only
//! on a TLS port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::procs::{TempDir, free_port};

/// A CA, a server certificate for `localhost` and `127.0.0.1`, a client certificate, and
/// an unrelated CA, as PEM files in a scratch directory.
pub struct Pki {
    pub dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let root = ca("redfuse test CA");
        let other = ca("some other CA");

        let leaf = |names: Vec<String>, purpose: ExtendedKeyUsagePurpose, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![purpose];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, &root).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "localhost",
        );
        let (client_pem, client_key) = leaf(
            vec!["redfuse".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "redfuse",
        );
        Pki {
            ca: dir.write("ca.crt", &root.pem()),
            server_cert: dir.write("server.crt", &server_pem),
            server_key: dir.write("server.key", &server_key),
            client_cert: dir.write("client.crt", &client_pem),
            client_key: dir.write("client.key", &client_key),
            other_ca: dir.write("other-ca.crt", &other.pem()),
            dir,
        }
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// `redis-server --port 0 --tls-port <p>`: TLS only, certificates from a [`Pki`].
pub struct TlsRedis {
    pub port: u16,
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl TlsRedis {
    /// `auth_clients`: `--tls-auth-clients yes` (a client certificate is required).
    pub fn start(pki: &Pki, auth_clients: bool) -> TlsRedis {
        let mut last = String::new();
        for _ in 0..10 {
            let dir = TempDir::new("tls-redis");
            let port = free_port();
            let log = dir.path().join("redis.log");
            let file = std::fs::File::create(&log).unwrap();
            let mut child = Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--tls-cert-file")
                .arg(&pki.server_cert)
                .arg("--tls-key-file")
                .arg(&pki.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .args([
                    "--tls-auth-clients",
                    if auth_clients { "yes" } else { "no" },
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn redis-server: {e}"));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("exited with {status}:\n{text}");
                    break;
                }
                if text.contains("Ready to accept connections") {
                    return TlsRedis {
                        port,
                        child,
                        log,
                        _dir: dir,
                    };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("TLS redis-server did not start:\n{text}");
                }
                thread::sleep(Duration::from_millis(10));
            }
            if !last.contains("Address already in use") {
                break;
            }
        }
        panic!("TLS redis-server failed to start: {last}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
