//! `talon cert`: a cluster CA and the certificates of its coordinators,
//! nodes and clients, so that TLS is two commands away:
//!
//! ```sh
//! talon cert init --dir certs
//! talon cert issue --dir certs --kind coordinator --name c1 --host 10.0.0.5 --host c1.talon
//! ```
//!
//! Coordinator certificates carry the common name `talon-coordinator-<name>`
//! (the Raft port admits only those); node and client certificates
//! `talon-node-<name>` and `talon-client-<name>`. Keys are ECDSA P-256,
//! written with mode 0600; certificates are valid for `--days` (default
//! 365; the CA 3650).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Subcommand)]
pub enum CertCmd {
    /// Make the cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate signed by the CA in DIR: NAME.pem and NAME.key.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// coordinator, node or client.
        #[arg(long)]
        kind: String,
        /// Short name, e.g. c1 or gpu-host-7; files are named after it.
        #[arg(long)]
        name: String,
        /// Host names and IP addresses the certificate is valid for
        /// (repeatable; coordinators need the address peers and clients dial).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(|e| {
        format!(
            "cannot create {}: {e} (an existing file is never overwritten; move it away to rotate)",
            path.display()
        )
    })?;
    f.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(300)).into();
    params.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 48
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "name {name:?} must be 1 to 48 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// Runs a `cert` command; prints what it wrote.
pub fn run(cmd: CertCmd) -> Result<(), String> {
    match cmd {
        CertCmd::Init { dir, days } => {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "talon cluster CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut params, days);
            let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
            write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
            write_file(&dir.join("ca.pem"), cert.pem().as_bytes(), false)?;
            println!(
                "wrote {0}/ca.pem and {0}/ca.key (keep ca.key offline)",
                dir.display()
            );
        }
        CertCmd::Issue {
            dir,
            kind,
            name,
            hosts,
            days,
        } => {
            check_name(&name)?;
            let (cn, usage) = match kind.as_str() {
                "coordinator" => (
                    format!("talon-coordinator-{name}"),
                    vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ],
                ),
                "node" => (
                    format!("talon-node-{name}"),
                    vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ],
                ),
                "client" => (
                    format!("talon-client-{name}"),
                    vec![ExtendedKeyUsagePurpose::ClientAuth],
                ),
                other => {
                    return Err(format!(
                        "kind {other:?} is unknown; use coordinator, node or client"
                    ))
                }
            };
            if kind != "client" && hosts.is_empty() {
                return Err(format!(
                    "a {kind} certificate needs at least one --host (the names and addresses others dial)"
                ));
            }
            let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| {
                format!(
                    "cannot read {}/ca.pem: {e}; run `talon cert init --dir {}` first",
                    dir.display(),
                    dir.display()
                )
            })?;
            let ca_key = std::fs::read_to_string(dir.join("ca.key"))
                .map_err(|e| format!("cannot read {}/ca.key: {e}", dir.display()))?;
            let ca_key = KeyPair::from_pem(&ca_key).map_err(|e| format!("ca.key: {e}"))?;
            let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
                .map_err(|e| format!("ca.pem: {e}"))?
                .self_signed(&ca_key)
                .map_err(|e| format!("ca.pem and ca.key do not go together: {e}"))?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn.clone());
            params.distinguished_name = dn;
            params.subject_alt_names = hosts
                .iter()
                .map(|h| match h.parse::<std::net::IpAddr>() {
                    Ok(ip) => Ok(SanType::IpAddress(ip)),
                    Err(_) => h
                        .clone()
                        .try_into()
                        .map(SanType::DnsName)
                        .map_err(|e| format!("host {h:?}: {e}")),
                })
                .collect::<Result<_, String>>()?;
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = usage;
            validity(&mut params, days);
            let key = KeyPair::generate().map_err(|e| e.to_string())?;
            let cert = params
                .signed_by(&key, &ca, &ca_key)
                .map_err(|e| e.to_string())?;
            write_file(
                &dir.join(format!("{name}.key")),
                key.serialize_pem().as_bytes(),
                true,
            )?;
            write_file(
                &dir.join(format!("{name}.pem")),
                cert.pem().as_bytes(),
                false,
            )?;
            println!(
                "wrote {dir}/{name}.pem and {dir}/{name}.key for {cn} ({hosts})",
                dir = dir.display(),
                hosts = hosts.join(", ")
            );
        }
    }
    Ok(())
}
