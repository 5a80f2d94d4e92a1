//! Local verification of ServiceAccount JWTs, as kube-apiserver's
//! `--service-account-key-file` authenticator does it.
//!
//! Checking a signature here costs tens of microseconds; a TokenReview round
//! trip costs a request to the very apiserver we protect. The rules follow
//! `pkg/serviceaccount/jwt.go` and `claims.go`:
//!
//! - `alg` one of RS256/RS384/RS512/ES256/ES384 (never `none` or HMAC, so a
//!   public key can never be used as a shared secret); the key chosen by `kid`
//!   when some key has it (the apiserver's kid is the base64url SHA-256 of the
//!   key's SPKI DER), else every key of the right type is tried;
//! - `exp` required, `nbf` and `iat` checked when present, each with the
//!   configured skew; `aud` must intersect the accepted audiences;
//! - `sub` must be `system:serviceaccount:{kubernetes.io.namespace}:{name}`;
//! - username = `sub`, uid = the ServiceAccount's uid, groups
//!   `system:serviceaccounts` and `system:serviceaccounts:{ns}`; `extra`
//!   pod-name/pod-uid (both needed), node-name (node-uid with it), and
//!   credential-id = `JTI={jti}`, exactly the apiserver's `ServiceAccountInfo`.
//!
//! Not done here, unlike the apiserver: checking that the ServiceAccount,
//! Pod or Secret still exists. A bound token stays good until it expires
//! (an hour by default) even if its Pod is deleted; the upstream still
//! authorizes every request.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use ring::signature::{self as sig, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{Identity, IdentityError, SERVICE_ACCOUNT_PREFIX};
use crate::error::Chain;

/// `extra` keys the apiserver sets for ServiceAccount tokens.
pub(crate) const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
pub(crate) const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
pub(crate) const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
pub(crate) const NODE_UID_KEY: &str = "authentication.kubernetes.io/node-uid";
use super::x509::CREDENTIAL_ID_KEY;

const RSA_ALGS: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
/// ring verifies RSA signatures of 2,048 to 8,192 bits only; an apiserver
/// built with Go 1.23 or older accepts 1,024-bit ServiceAccount keys.
const MIN_RSA_BITS: usize = 2048;
const P256_ALGS: &[Algorithm] = &[Algorithm::ES256];
const P384_ALGS: &[Algorithm] = &[Algorithm::ES384];

/// One public key and the algorithms it may verify.
pub(crate) struct VerifyKey {
    kid: Option<String>,
    algs: &'static [Algorithm],
    key: PublicKey,
}

/// A public key as ring verifies it. ring, not jsonwebtoken's pure-Rust
/// backend: a DaemonSet's storm brings thousands of new tokens at once, and
/// a P-256 verification there cost ~270 µs (a third of the proxy's CPU in
/// the 5,000-agent storm); ring's takes a fraction of that.
enum PublicKey {
    /// PKCS#1 `RSAPublicKey` DER.
    RsaDer(Vec<u8>),
    /// A JWK's modulus and exponent (big-endian bytes).
    RsaParts { n: Vec<u8>, e: Vec<u8> },
    /// A SEC1 uncompressed point.
    Ec(Vec<u8>),
}

impl PublicKey {
    /// Whether `signature` (raw bytes, as JWS carries them: PKCS#1 v1.5 for
    /// RS*, fixed-width r||s for ES*) signs `message` with `alg`.
    fn verifies(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        let rsa: &'static sig::RsaParameters = match alg {
            Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::ES256 | Algorithm::ES384 => {
                let ec: &'static sig::EcdsaVerificationAlgorithm = if alg == Algorithm::ES256 {
                    &sig::ECDSA_P256_SHA256_FIXED
                } else {
                    &sig::ECDSA_P384_SHA384_FIXED
                };
                return match self {
                    PublicKey::Ec(point) => UnparsedPublicKey::new(ec, point)
                        .verify(message, signature)
                        .is_ok(),
                    _ => false,
                };
            }
            _ => return false,
        };
        match self {
            PublicKey::RsaDer(der) => UnparsedPublicKey::new(rsa, der)
                .verify(message, signature)
                .is_ok(),
            PublicKey::RsaParts { n, e } => RsaPublicKeyComponents { n, e }
                .verify(rsa, message, signature)
                .is_ok(),
            PublicKey::Ec(_) => false,
        }
    }

    /// The size of an RSA key's modulus in bits; `None` for EC keys (and
    /// for DER ring could not read either).
    fn rsa_bits(&self) -> Option<usize> {
        match self {
            PublicKey::RsaParts { n, .. } => Some(unsigned_bits(n)),
            PublicKey::RsaDer(der) => x509_parser::public_key::RSAPublicKey::from_der(der)
                .ok()
                .map(|(_, key)| unsigned_bits(key.modulus)),
            PublicKey::Ec(_) => None,
        }
    }

    /// The key of a JWK (RSA or EC; the caller checked the type).
    fn from_jwk(jwk: &AlgorithmParameters) -> Result<PublicKey, String> {
        let b64 = |field: &str, v: &str| {
            URL_SAFE_NO_PAD
                .decode(v.trim_end_matches('='))
                .map_err(|e| format!("invalid JWK: {field} is not base64url: {e}"))
        };
        match jwk {
            AlgorithmParameters::RSA(rsa) => Ok(PublicKey::RsaParts {
                n: b64("n", &rsa.n)?,
                e: b64("e", &rsa.e)?,
            }),
            AlgorithmParameters::EllipticCurve(ec) => {
                let (x, y) = (b64("x", &ec.x)?, b64("y", &ec.y)?);
                let width = if ec.curve == EllipticCurve::P256 {
                    32
                } else {
                    48
                };
                if x.len() != width || y.len() != width {
                    return Err(format!(
                        "invalid JWK: x and y must be {width} bytes for {:?}",
                        ec.curve
                    ));
                }
                let mut point = Vec::with_capacity(1 + 2 * width);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Ok(PublicKey::Ec(point))
            }
            _ => Err("unsupported key type (RSA and EC only)".into()),
        }
    }
}

/// The ServiceAccount public keys; replaced whole on reload.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<VerifyKey>,
    /// RSA keys under [`MIN_RSA_BITS`], which ring cannot verify with: the
    /// `kid` of each (`None` for PKCS#1, which has none). A token one of
    /// them may have signed is asked about upstream ([`JwtError::ShortKey`]).
    short: Vec<Option<String>>,
}

impl KeySet {
    /// Reads every file; one bad file fails the whole load, so a half-written
    /// rotation never silently drops keys.
    pub(crate) fn load(paths: &[PathBuf]) -> Result<KeySet, IdentityError> {
        let mut set = KeySet::default();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|source| IdentityError::ReadKeyFile {
                path: path.clone(),
                source,
            })?;
            let parse = |reason: String| IdentityError::ParseKeyFile {
                path: path.clone(),
                reason,
            };
            let mut loaded = Vec::new();
            if bytes.trim_ascii_start().starts_with(b"{") {
                load_jwks(&bytes, &mut loaded).map_err(parse)?;
            } else {
                load_pem(path, &bytes, &mut loaded)?;
            }
            if loaded.is_empty() {
                return Err(parse("no usable public keys".into()));
            }
            for key in loaded {
                if let Some(bits) = set.add(key) {
                    tracing::warn!(
                        path = %path.display(),
                        bits,
                        kid = set.short.last().and_then(Option::as_deref).unwrap_or("-"),
                        "service account key: RSA under 2048 bits, which local verification (ring) refuses; \
                         not used here: tokens it may have signed are checked with a TokenReview upstream \
                         (rotate to a key of 2048 bits or more to verify them locally)"
                    );
                }
            }
        }
        Ok(set)
    }

    /// The keys of a JWK Set the apiserver published (`/openid/v1/jwks`),
    /// split as [`KeySet::load`] splits them.
    pub(crate) fn from_jwks(bytes: &[u8]) -> Result<KeySet, String> {
        let mut loaded = Vec::new();
        load_jwks(bytes, &mut loaded)?;
        let mut set = KeySet::default();
        for key in loaded {
            set.add(key);
        }
        Ok(set)
    }

    /// Adds `key`: to the usable keys, or, an RSA key under
    /// [`MIN_RSA_BITS`], to the short ones, returning its bits.
    fn add(&mut self, key: VerifyKey) -> Option<usize> {
        match key.key.rsa_bits() {
            Some(bits) if bits < MIN_RSA_BITS => {
                self.short.push(key.kid);
                Some(bits)
            }
            _ => {
                self.keys.push(key);
                None
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The keys to try for a token: those named by its `kid` if any key has
    /// that id, else all keys that can verify `alg`.
    pub(crate) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyKey> + 'a {
        let by_kid = kid.is_some_and(|kid| self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        self.keys
            .iter()
            .filter(move |k| k.algs.contains(&alg) && (!by_kid || k.kid.as_deref() == kid))
    }

    /// Whether a token no usable key verified may have been signed by a
    /// key too short for ring: an RSA token, some short key loaded, and no
    /// usable key named by its `kid` (that one would have been the signer,
    /// and it said no).
    fn short_key_may_have_signed(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        RSA_ALGS.contains(&alg)
            && !self.short.is_empty()
            && !kid.is_some_and(|kid| self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)))
    }
}

/// The bits of a big-endian unsigned integer.
fn unsigned_bits(n: &[u8]) -> usize {
    let skip = n.iter().take_while(|b| **b == 0).count();
    match n.get(skip) {
        Some(first) => (n.len() - skip) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn load_jwks(bytes: &[u8], keys: &mut Vec<VerifyKey>) -> Result<(), String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("invalid JWKS: {e}"))?;
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let algs = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA_ALGS,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => P256_ALGS,
                EllipticCurve::P384 => P384_ALGS,
                _ => return Err("unsupported elliptic curve (P-256 and P-384 only)".into()),
            },
            // A symmetric key would let anyone holding it mint tokens.
            _ => return Err("unsupported key type (RSA and EC only)".into()),
        };
        let key = PublicKey::from_jwk(&jwk.algorithm)?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            algs,
            key,
        });
    }
    Ok(())
}

fn load_pem(path: &Path, bytes: &[u8], keys: &mut Vec<VerifyKey>) -> Result<(), IdentityError> {
    let parse = |reason: String| IdentityError::ParseKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let mut private = false;
    for block in Pem::iter_from_buffer(bytes) {
        let block = block.map_err(|e| parse(format!("invalid PEM: {e}")))?;
        match block.label.as_str() {
            "PUBLIC KEY" => {
                let (_, spki) = SubjectPublicKeyInfo::from_der(&block.contents)
                    .map_err(|e| parse(format!("invalid public key: {e}")))?;
                keys.push(from_spki(&spki).map_err(parse)?);
            }
            "CERTIFICATE" => {
                let (_, cert) = X509Certificate::from_der(&block.contents)
                    .map_err(|e| parse(format!("invalid certificate: {e}")))?;
                keys.push(from_spki(cert.public_key()).map_err(parse)?);
            }
            "RSA PUBLIC KEY" => keys.push(VerifyKey {
                // PKCS#1 carries no SPKI to hash, so no kid: tried for every
                // RSA token.
                kid: None,
                algs: RSA_ALGS,
                key: PublicKey::RsaDer(block.contents.to_vec()),
            }),
            label if label.ends_with("PRIVATE KEY") => private = true,
            _ => {}
        }
    }
    if private && keys.is_empty() {
        return Err(parse(
            "contains only private keys; give the public key (openssl pkey -pubout)".into(),
        ));
    }
    Ok(())
}

fn from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<VerifyKey, String> {
    let kid = Some(URL_SAFE_NO_PAD.encode(Sha256::digest(spki.raw)));
    let oid = &spki.algorithm.algorithm;
    if *oid == OID_PKCS1_RSAENCRYPTION {
        // The BIT STRING of an RSA SPKI is the PKCS#1 RSAPublicKey.
        return Ok(VerifyKey {
            kid,
            algs: RSA_ALGS,
            key: PublicKey::RsaDer(spki.subject_public_key.data.to_vec()),
        });
    }
    if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let algs = match curve {
            Some(c) if c == OID_EC_P256 => P256_ALGS,
            Some(c) if c == OID_NIST_EC_P384 => P384_ALGS,
            _ => return Err("unsupported elliptic curve (P-256 and P-384 only)".into()),
        };
        // The BIT STRING of an EC SPKI is the SEC1 point.
        return Ok(VerifyKey {
            kid,
            algs,
            key: PublicKey::Ec(spki.subject_public_key.data.to_vec()),
        });
    }
    Err(format!(
        "unsupported public key algorithm {oid} (RSA and EC only)"
    ))
}

/// The claims the proxy reads. Everything optional so that any JSON object
/// parses and the checks below can say precisely what is missing.
#[derive(Deserialize, Default)]
pub(crate) struct Peeked {
    #[serde(default)]
    pub(crate) iss: String,
    #[serde(default)]
    sub: String,
    #[serde(default, deserialize_with = "audience")]
    aud: Vec<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iat: Option<f64>,
    #[serde(default)]
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Private>,
    /// A legacy token's flat claims (pkg/serviceaccount/legacy.go).
    #[serde(rename = "kubernetes.io/serviceaccount/namespace", default)]
    legacy_namespace: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name", default)]
    legacy_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.uid", default)]
    legacy_uid: String,
    #[serde(rename = "kubernetes.io/serviceaccount/secret.name", default)]
    legacy_secret: String,
}

/// The issuer of legacy ServiceAccount tokens (those of
/// `kubernetes.io/service-account-token` Secrets).
pub(crate) const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";

#[derive(Deserialize, Default)]
struct Private {
    #[serde(default)]
    namespace: String,
    serviceaccount: Option<Ref>,
    pod: Option<Ref>,
    node: Option<Ref>,
}

#[derive(Deserialize, Default)]
struct Ref {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

impl Peeked {
    /// The token's audiences.
    pub(crate) fn audiences(&self) -> &[String] {
        &self.aud
    }

    /// Whether it is a legacy ServiceAccount token: issuer
    /// [`LEGACY_ISSUER`], its flat claims all there.
    pub(crate) fn is_legacy_service_account(&self) -> bool {
        self.iss == LEGACY_ISSUER
            && [
                &self.legacy_namespace,
                &self.legacy_name,
                &self.legacy_uid,
                &self.legacy_secret,
            ]
            .iter()
            .all(|c| !c.is_empty())
    }

    /// Whether it names a ServiceAccount in a `kubernetes.io` claim, as the
    /// tokens of the TokenRequest API (projected and `kubectl create
    /// token`) do.
    pub(crate) fn names_service_account(&self) -> bool {
        self.kubernetes.as_ref().is_some_and(|k| {
            !k.namespace.is_empty()
                && k.serviceaccount
                    .as_ref()
                    .is_some_and(|sa| !sa.name.is_empty())
        })
    }
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
fn audience<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(a) => vec![a],
        Aud::Many(a) => a,
    })
}

/// The claims of something shaped like a JWT (three dot-separated parts,
/// a JSON object payload), unverified: only to decide whether it is ours to
/// verify. `None` for anything else (an opaque token).
pub(crate) fn peek(token: &str) -> Option<Peeked> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&json).ok()
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a token of a configured issuer was refused (never the token).
#[derive(Debug, thiserror::Error)]
pub(crate) enum JwtError {
    #[error("malformed header: {0}")]
    Header(String),
    #[error("algorithm {0:?} not accepted")]
    Algorithm(Algorithm),
    #[error("signature verification failed (no configured key verifies it)")]
    Signature,
    /// Not verified here: possibly signed by an RSA key under 2,048 bits,
    /// which ring refuses; the token goes to TokenReview instead.
    #[error("possibly signed by an RSA key under 2048 bits, which cannot be verified locally")]
    ShortKey,
    #[error("no exp claim")]
    NoExpiry,
    #[error("service account token has expired")]
    Expired,
    #[error("service account token is not valid yet")]
    NotYetValid,
    #[error("service account token was issued in the future")]
    IssuedInFuture,
    #[error("token audiences {0:?} do not intersect the accepted audiences")]
    Audience(Vec<String>),
    #[error("no kubernetes.io namespace/serviceaccount claims")]
    NoServiceAccount,
    #[error("sub does not name the token's service account")]
    Subject,
}

/// A verified token: its identity (without `system:authenticated`) and
/// expiry.
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    pub(crate) exp: u64,
}

/// A legacy token's identity, once its signature verifies with `keys`
/// (the apiserver has said it accepts it: legacy tokens carry no expiry
/// and no audience, and their Secret must still exist, which only the
/// apiserver can tell). The user the apiserver names it: the claims'
/// ServiceAccount, its uid, its groups; no extra.
pub(crate) fn verify_legacy(
    token: &str,
    claims: Peeked,
    keys: &KeySet,
) -> Result<Identity, JwtError> {
    check_signature(token, keys)?;
    if !claims.is_legacy_service_account() {
        return Err(JwtError::NoServiceAccount);
    }
    let ns = claims.legacy_namespace;
    if claims.sub != format!("{SERVICE_ACCOUNT_PREFIX}{ns}:{}", claims.legacy_name) {
        return Err(JwtError::Subject);
    }
    Ok(Identity {
        groups: service_account_groups(&ns),
        username: claims.sub,
        uid: claims.legacy_uid,
        extra: BTreeMap::new(),
    })
}

/// A ServiceAccount's groups, as the apiserver gives them (without
/// `system:authenticated`).
fn service_account_groups(namespace: &str) -> Vec<String> {
    vec![
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{namespace}"),
    ]
}

/// Checks the header's algorithm and the signature against `keys`.
fn check_signature(token: &str, keys: &KeySet) -> Result<(), JwtError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Header(Chain(&e).to_string()))?;
    let alg = header.alg;
    if !matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::ES256
            | Algorithm::ES384
    ) {
        return Err(JwtError::Algorithm(alg));
    }
    let (message, signature) = token.rsplit_once('.').ok_or(JwtError::Signature)?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Signature)?;
    let ok = keys
        .candidates(header.kid.as_deref(), alg)
        .any(|k| k.key.verifies(alg, message.as_bytes(), &signature));
    if !ok {
        if keys.short_key_may_have_signed(header.kid.as_deref(), alg) {
            return Err(JwtError::ShortKey);
        }
        return Err(JwtError::Signature);
    }
    Ok(())
}

/// Verifies `token` (whose claims `peek` gave) at time `now`.
pub(crate) fn verify(
    token: &str,
    claims: Peeked,
    keys: &KeySet,
    audiences: &[String],
    now: u64,
    skew: u64,
) -> Result<Verified, JwtError> {
    check_signature(token, keys)?;

    // Times: NumericDate may be fractional; compare in whole seconds as
    // go-jose does (it truncates).
    let secs = |t: f64| if t <= 0.0 { 0 } else { t as u64 };
    let exp = secs(claims.exp.ok_or(JwtError::NoExpiry)?);
    if now.saturating_sub(skew) > exp {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = claims.nbf
        && now.saturating_add(skew) < secs(nbf)
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(iat) = claims.iat
        && now.saturating_add(skew) < secs(iat)
    {
        return Err(JwtError::IssuedInFuture);
    }
    if !claims.aud.iter().any(|a| audiences.contains(a)) {
        return Err(JwtError::Audience(claims.aud));
    }

    let private = claims.kubernetes.unwrap_or_default();
    let sa = private.serviceaccount.unwrap_or_default();
    if private.namespace.is_empty() || sa.name.is_empty() {
        return Err(JwtError::NoServiceAccount);
    }
    let ns = private.namespace;
    // The apiserver names the user from the private claims; insisting that
    // `sub` agrees keeps the two from ever telling different stories.
    let matches_sub = claims
        .sub
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(n, name)| n == ns && name == sa.name);
    if !matches_sub {
        return Err(JwtError::Subject);
    }

    let mut extra = BTreeMap::new();
    if let Some(pod) = private.pod
        && !pod.name.is_empty()
        && !pod.uid.is_empty()
    {
        extra.insert(POD_NAME_KEY.to_string(), vec![pod.name]);
        extra.insert(POD_UID_KEY.to_string(), vec![pod.uid]);
    }
    if !claims.jti.is_empty() {
        extra.insert(
            CREDENTIAL_ID_KEY.to_string(),
            vec![format!("JTI={}", claims.jti)],
        );
    }
    if let Some(node) = private.node
        && !node.name.is_empty()
    {
        extra.insert(NODE_NAME_KEY.to_string(), vec![node.name]);
        if !node.uid.is_empty() {
            extra.insert(NODE_UID_KEY.to_string(), vec![node.uid]);
        }
    }
    Ok(Verified {
        identity: Identity {
            username: claims.sub,
            uid: sa.uid,
            groups: service_account_groups(&ns),
            extra,
        },
        exp,
    })
}
