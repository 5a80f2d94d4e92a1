//! The identity in a verified client certificate, by the apiserver's
//! `CommonNameUserConversion`: CN = username, each O = a group, the subject's
//! UID attribute (OID 1.3.6.1.4.1.14677.1.1.1) = uid when present, and the
//! certificate's fingerprint as `authentication.kubernetes.io/credential-id`
//! (`X509SHA256=<hex>`), so audit and limits can tell two certificates of one
//! user apart.
//!
//! The TLS layer has already verified the chain; this only reads the subject.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Identity, IdentityError};

/// The extra key the apiserver puts a credential's fingerprint under.
pub(crate) const CREDENTIAL_ID_KEY: &str = "authentication.kubernetes.io/credential-id";

/// The Kubernetes x509 UID attribute, 1.3.6.1.4.1.14677.1.1.1.
const UID_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 14677, 1, 1, 1];

/// CN, O, UID and fingerprint of `der`; `system:authenticated` is added by
/// the caller.
pub(crate) fn identity(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| IdentityError::Certificate(format!("unparsable: {e}")))?;
    let subject = cert.subject();
    // Go's pkix.Name keeps the last CN when there are several; take the same.
    let username = subject
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .last()
        .unwrap_or_default();
    if username.is_empty() {
        return Err(IdentityError::Certificate(
            "subject has no common name".into(),
        ));
    }
    let groups = subject
        .iter_organization()
        .map(|o| {
            o.as_str()
                .map(str::to_string)
                .map_err(|_| IdentityError::Certificate("organization is not a string".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let uid_oid = Oid::from(UID_OID).expect("constant OID is valid");
    let uids: Vec<&str> = subject
        .iter_by_oid(&uid_oid)
        .filter_map(|a| a.as_str().ok())
        .collect();
    let uid = match uids.as_slice() {
        [] => String::new(),
        [one] => (*one).to_string(),
        _ => {
            return Err(IdentityError::Certificate(
                "more than one UID attribute".into(),
            ));
        }
    };
    let fingerprint = Sha256::digest(der);
    let mut extra = BTreeMap::new();
    extra.insert(
        CREDENTIAL_ID_KEY.to_string(),
        vec![format!("X509SHA256={}", hex(&fingerprint))],
    );
    Ok(Identity {
        username: username.to_string(),
        uid,
        groups,
        extra,
    })
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}
