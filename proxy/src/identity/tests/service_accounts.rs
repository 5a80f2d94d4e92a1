//! ServiceAccount JWTs verified locally: keys from PEM, certificate and JWKS
//! files, the claims the apiserver checks, and key rotation on reload.

use super::*;

/// A 1,024-bit RSA key (`openssl genrsa -traditional 1024`): what an apiserver on Go 1.23 or older accepts and ring refuses.
const SHORT_RSA_PRIVATE_PEM: &str = "\
-----BEGIN RSA PRIVATE KEY-----\n\
MIICXAIBAAKBgQC5R+ABHvpoF8JEu62eOG75/62x6wCiOyhARJFCm211lWCQ+XWX\n\
PK/RSa3N4KYzl6ziYITBvf85sAnsXWVBFSgL+mvaMcBR26xisOtzdRYwu5IxOtMA\n\
ZbF4zCbQ/kAGPDA9c+Z4ETlrjd97l87JytRT2ZQ52G3CK79nfdQlPBxYewIDAQAB\n\
AoGAVGo12ezmQ7THcw9bG+I0Vbyyw4QBZuiy/wz+ba1o4pCrTYIKnFwu8piyEkHP\n\
F2R8hStacPcCqKLW8pTexBdCheO10hP2PbnOXKouwQezkcWZ0qCb41fmFX7kVD15\n\
a/NRMGV2llnoiEvdawiljgDVu2GMBSwte9iaGxehrnGf8zkCQQDoRTJN/cdf1EGF\n\
10giBiB8SR5H5s81H4UMiZ6lswtJxSg5B0PrtZEV3d4xM74lNHZHLsq82W8T6VY4\n\
IkHhQ2ldAkEAzDW2gnR/dSomQZ+0Bu6uqSOSLYk+imsIdmwnhONJj5AqlM809yH5\n\
nzdJYPEnSPaEcCHvrRpAx3NEgH6o90CztwJACYbNCWXfR47tIRAzZTHbIz3cgBZ3\n\
aTZhvqHmX+V4EQ6FF9G0d3Z6/Oqcsmfs5JnCQCkrJ5PDeo2Xe7Xr/dFGAQJBAKfv\n\
5FAUjl1EdIGzXNH2qBzg6+4W2B/tNeBtwXI/mNc/sEUAwoYaoraVOPtIVw5h7Thq\n\
MDkjRfLAkK07fKkZxLECQDOBZsXqwtw58QjDUXvyrHMx1Xuv9zjFUIRszNh67zr8\n\
/3fBizaWD6gTadLEh7VLtjCP+9dSe3MWGM7wNRBnGe4=\n\
-----END RSA PRIVATE KEY-----\n\
";

/// Its public key, SPKI (`openssl rsa -pubout`).
const SHORT_RSA_PUBLIC_PEM: &str = "\
-----BEGIN PUBLIC KEY-----\n\
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQC5R+ABHvpoF8JEu62eOG75/62x\n\
6wCiOyhARJFCm211lWCQ+XWXPK/RSa3N4KYzl6ziYITBvf85sAnsXWVBFSgL+mva\n\
McBR26xisOtzdRYwu5IxOtMAZbF4zCbQ/kAGPDA9c+Z4ETlrjd97l87JytRT2ZQ5\n\
2G3CK79nfdQlPBxYewIDAQAB\n\
-----END PUBLIC KEY-----\n\
";

/// Its public key, PKCS#1 (`openssl rsa -RSAPublicKey_out`): no kid.
const SHORT_RSA_PKCS1_PEM: &str = "\
-----BEGIN RSA PUBLIC KEY-----\n\
MIGJAoGBALlH4AEe+mgXwkS7rZ44bvn/rbHrAKI7KEBEkUKbbXWVYJD5dZc8r9FJ\n\
rc3gpjOXrOJghMG9/zmwCexdZUEVKAv6a9oxwFHbrGKw63N1FjC7kjE60wBlsXjM\n\
JtD+QAY8MD1z5ngROWuN33uXzsnK1FPZlDnYbcIrv2d91CU8HFh7AgMBAAE=\n\
-----END RSA PUBLIC KEY-----\n\
";

#[tokio::test]
async fn fixture_shaped_token_gives_the_tokenreview_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&fixture_claims())))
        .await
        .expect("valid token");
    assert_eq!(*got, fixture_identity());
    assert_eq!(got.service_account(), Some(("fixtures", "limited")));
    assert!(!got.is_anonymous());
}

#[tokio::test]
async fn pod_bound_token_carries_pod_node_and_credential_extra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&pod_claims())))
        .await
        .expect("valid token");
    let mut want = fixture_identity();
    for (k, v) in [
        ("authentication.kubernetes.io/pod-name", "agent-x7"),
        ("authentication.kubernetes.io/pod-uid", "pod-uid-1"),
        ("authentication.kubernetes.io/node-name", "node-7"),
        ("authentication.kubernetes.io/node-uid", "node-uid-7"),
        (
            "authentication.kubernetes.io/credential-id",
            "JTI=4f7d1a5e-0c1b-4f55-9d4c-2b3c9b0e8a11",
        ),
    ] {
        want.extra.insert(k.into(), vec![v.into()]);
    }
    assert_eq!(*got, want);
}

#[tokio::test]
async fn pod_claim_without_uid_adds_no_pod_extra() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let mut claims = fixture_claims();
    claims["kubernetes.io"]["pod"] = json!({"name": "agent-x7"});
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&claims)))
        .await
        .expect("valid token");
    assert!(got.extra.is_empty(), "{:?}", got.extra);
}

#[tokio::test]
async fn rsa_tokens_verify_with_public_key_and_certificate_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in [("rsa.pub", RSA_PUBLIC_PEM), ("rsa.crt", RSA_CERT_PEM)] {
        let auth = Authenticator::new(sa_config(vec![write(dir.path(), name, content)]), None)
            .expect("authenticator");
        for alg in [Algorithm::RS256, Algorithm::RS384, Algorithm::RS512] {
            let token = Signer::rsa(alg).sign(&fixture_claims());
            let got = auth.authenticate(None, &bearer(&token)).await;
            assert_eq!(
                *got.expect("rsa token"),
                fixture_identity(),
                "{name} {alg:?}"
            );
        }
    }
}

#[tokio::test]
async fn several_keys_in_one_file_and_several_files_all_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, a_pub) = Signer::ec();
    let (b, b_pub) = Signer::ec384();
    let (c, c_pub) = Signer::ec();
    let both = format!("{a_pub}{RSA_PUBLIC_PEM}{b_pub}");
    let auth = Authenticator::new(
        sa_config(vec![
            write(dir.path(), "both.pem", &both),
            write(dir.path(), "c.pem", &c_pub),
        ]),
        None,
    )
    .expect("authenticator");
    for signer in [&a, &b, &c, &Signer::rsa(Algorithm::RS256)] {
        let token = signer.sign(&fixture_claims());
        assert!(
            auth.authenticate(None, &bearer(&token)).await.is_ok(),
            "{:?}",
            signer.alg
        );
    }
}

#[tokio::test]
async fn jwks_file_verifies_tokens_and_selects_by_kid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ec, _) = Signer::ec();
    let mut rsa = Signer::rsa(Algorithm::RS256);
    ec.kid = Some("ec-1".into());
    rsa.kid = Some("rsa-1".into());
    let mut ec_jwk = Jwk::from_encoding_key(&ec.key, Algorithm::ES256).expect("ec jwk");
    ec_jwk.common.key_id = ec.kid.clone();
    let mut rsa_jwk = Jwk::from_encoding_key(&rsa.key, Algorithm::RS256).expect("rsa jwk");
    rsa_jwk.common.key_id = rsa.kid.clone();
    let set = JwkSet {
        keys: vec![ec_jwk, rsa_jwk],
    };
    let file = write(
        dir.path(),
        "keys.json",
        &serde_json::to_string(&set).expect("json"),
    );
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    for signer in [&ec, &rsa] {
        let token = signer.sign(&fixture_claims());
        assert_eq!(
            *auth
                .authenticate(None, &bearer(&token))
                .await
                .expect("jwks"),
            fixture_identity()
        );
    }
    // A kid naming the EC key on an RSA signature: only the EC key is tried.
    rsa.kid = Some("ec-1".into());
    let reason = invalid_reason(
        auth.authenticate(None, &bearer(&rsa.sign(&fixture_claims())))
            .await,
    );
    assert!(reason.contains("signature"), "{reason}");
}

#[tokio::test]
async fn pem_key_kid_is_the_apiserver_key_id() {
    // The apiserver's kid: base64url(SHA-256(SPKI DER)). A token naming it
    // picks that key; an unknown kid still tries every key.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut signer, public) = Signer::ec();
    let (_, spki) = x509_parser::pem::parse_x509_pem(public.as_bytes()).expect("pem");
    use base64::Engine as _;
    let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(<sha2::Sha256 as sha2::Digest>::digest(&spki.contents));
    let file = write(dir.path(), "sa.pub", &format!("{RSA_PUBLIC_PEM}{public}"));
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    let keys = auth.keys.load();
    assert_eq!(keys.candidates(Some(&kid), Algorithm::ES256).count(), 1);
    signer.kid = Some(kid);
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&fixture_claims())))
            .await
            .is_ok()
    );
    signer.kid = Some("unknown".into());
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&pod_claims())))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn bad_tokens_of_the_configured_issuer_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let (forger, _) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let auth = reviewed(
        sa_config(vec![write(dir.path(), "sa.pub", &public)]),
        &reviewer,
    );
    let now = now();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = fixture_claims();
        f(&mut c);
        c
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            signer.sign(&with(&|c| c["exp"] = json!(now - 120))),
            "expired",
        ),
        (
            "not yet valid",
            signer.sign(&with(&|c| c["nbf"] = json!(now + 600))),
            "not valid yet",
        ),
        (
            "issued in the future",
            signer.sign(&with(&|c| c["iat"] = json!(now + 600))),
            "future",
        ),
        (
            "no exp",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("exp");
            })),
            "exp",
        ),
        (
            "wrong audience",
            signer.sign(&with(&|c| c["aud"] = json!(["https://other"]))),
            "audiences",
        ),
        (
            "no audience",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("aud");
            })),
            "audiences",
        ),
        ("forged", forger.sign(&fixture_claims()), "signature"),
        (
            "sub of another account",
            signer.sign(&with(&|c| {
                c["sub"] = json!("system:serviceaccount:kube-system:admin")
            })),
            "sub",
        ),
        (
            "no kubernetes.io claims",
            signer.sign(&with(&|c| {
                c.as_object_mut().expect("object").remove("kubernetes.io");
            })),
            "kubernetes.io",
        ),
        (
            "HS256 with the public key as secret",
            Signer {
                key: EncodingKey::from_secret(public.as_bytes()),
                alg: Algorithm::HS256,
                kid: None,
            }
            .sign(&fixture_claims()),
            "algorithm",
        ),
    ];
    for (name, token, want) in cases {
        let result = auth.authenticate(None, &bearer(&token)).await;
        let err = result.expect_err(name);
        assert_eq!(err.status_code(), 401, "{name}");
        assert_eq!(err.client_message(), "Unauthorized");
        let AuthError::InvalidToken(reason) = &err else {
            panic!("{name}: {err:?}");
        };
        assert!(reason.contains(want), "{name}: {reason}");
        // The reason and Debug are for logs: never the token.
        assert!(!format!("{err} {err:?}").contains(&token), "{name}");
    }
    // None of them fell through to TokenReview.
    assert_eq!(reviewer.calls(), 0);
}

#[tokio::test]
async fn unsigned_alg_none_token_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let token = format!(
        "{}.{}.",
        b64(&json!({"alg": "none"})),
        b64(&fixture_claims())
    );
    let reason = invalid_reason(auth.authenticate(None, &bearer(&token)).await);
    assert!(
        reason.contains("header") || reason.contains("algorithm"),
        "{reason}"
    );
}

#[tokio::test]
async fn expiry_within_the_clock_skew_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let auth = Authenticator::new(sa_config(vec![write(dir.path(), "sa.pub", &public)]), None)
        .expect("authenticator");
    let mut claims = fixture_claims();
    claims["exp"] = json!(now() - 20);
    claims["nbf"] = json!(now() + 20);
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&claims)))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn explicit_api_audiences_replace_the_issuer_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let mut cfg = sa_config(vec![write(dir.path(), "sa.pub", &public)]);
    cfg.api_audiences = vec!["api".into(), "breakwater".into()];
    let auth = Authenticator::new(cfg, None).expect("authenticator");
    let mut claims = fixture_claims();
    claims["aud"] = json!("breakwater");
    assert!(
        auth.authenticate(None, &bearer(&signer.sign(&claims)))
            .await
            .is_ok()
    );
    let reason = invalid_reason(
        auth.authenticate(None, &bearer(&signer.sign(&fixture_claims())))
            .await,
    );
    assert!(reason.contains("audiences"), "{reason}");
}

#[tokio::test]
async fn jwt_of_an_unconfigured_issuer_goes_to_token_review() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (signer, public) = Signer::ec();
    let mut claims = fixture_claims();
    claims["iss"] = json!("https://oidc.example.com");
    let token = signer.sign(&claims);
    let reviewer = FakeReviewer::new(Ok(Some(alice())), false);
    let files = vec![write(dir.path(), "sa.pub", &public)];
    let auth = reviewed(sa_config(files.clone()), &reviewer);
    let got = auth
        .authenticate(None, &bearer(&token))
        .await
        .expect("reviewed");
    assert_eq!(*got, alice());
    assert_eq!(reviewer.calls(), 1);
    // Without a reviewer nobody can vouch for it.
    let alone = Authenticator::new(sa_config(files), None).expect("authenticator");
    let err = alone
        .authenticate(None, &bearer(&token))
        .await
        .expect_err("no reviewer");
    assert!(matches!(err, AuthError::CannotVerify), "{err:?}");
    assert_eq!(err.status_code(), 401);
}

#[tokio::test]
async fn without_issuers_every_token_goes_to_token_review() {
    let (signer, _) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(fixture_identity())), false);
    let auth = reviewed(AuthConfig::default(), &reviewer);
    let got = auth
        .authenticate(None, &bearer(&signer.sign(&fixture_claims())))
        .await
        .expect("reviewed");
    assert_eq!(*got, fixture_identity());
    assert_eq!(reviewer.calls(), 1);
}

#[tokio::test]
async fn reload_picks_up_a_rotated_key_and_keeps_the_old_keys_on_a_broken_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, old_pub) = Signer::ec();
    let (new, new_pub) = Signer::ec();
    let file = write(dir.path(), "sa.pub", &old_pub);
    let auth = Authenticator::new(sa_config(vec![file.clone()]), None).expect("authenticator");
    let old_token = old.sign(&fixture_claims());
    assert!(auth.authenticate(None, &bearer(&old_token)).await.is_ok());

    write(dir.path(), "sa.pub", &new_pub);
    auth.reload_keys().expect("reload");
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&fixture_claims())))
            .await
            .is_ok()
    );
    // The withdrawn key's token stops working at once, though it was cached.
    let reason = invalid_reason(auth.authenticate(None, &bearer(&old_token)).await);
    assert!(reason.contains("signature"), "{reason}");

    // A half-written file: the reload fails, naming the file; the keys stay.
    write(dir.path(), "sa.pub", &new_pub[..new_pub.len() / 2]);
    let err = auth.reload_keys().expect_err("broken file");
    assert!(err.to_string().contains("sa.pub"), "{err}");
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&pod_claims())))
            .await
            .is_ok()
    );

    std::fs::remove_file(&file).expect("remove");
    assert!(matches!(
        auth.reload_keys(),
        Err(IdentityError::ReadKeyFile { .. })
    ));
    assert!(
        auth.authenticate(None, &bearer(&new.sign(&pod_claims())))
            .await
            .is_ok()
    );
}

#[test]
fn key_files_that_cannot_be_used_are_refused_at_startup() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Authenticator::new(sa_config(vec![]), None),
        Err(IdentityError::NoKeys)
    ));
    let private = write(dir.path(), "private.pem", RSA_PRIVATE_PEM);
    let err = Authenticator::new(sa_config(vec![private]), None).expect_err("private only");
    assert!(err.to_string().contains("private"), "{err}");
    // Nothing about the key itself in the message.
    assert!(!err.to_string().contains("MII"), "{err}");
    let empty = write(dir.path(), "empty.pem", "nothing here\n");
    let err = Authenticator::new(sa_config(vec![empty]), None).expect_err("no keys");
    assert!(err.to_string().contains("no usable public keys"), "{err}");
    let hmac = write(
        dir.path(),
        "hmac.json",
        r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#,
    );
    let err = Authenticator::new(sa_config(vec![hmac]), None).expect_err("symmetric");
    assert!(err.to_string().contains("unsupported key type"), "{err}");
}

#[test]
fn debug_output_names_no_key_material() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write(dir.path(), "sa.pub", RSA_PUBLIC_PEM);
    let auth = Authenticator::new(sa_config(vec![file]), None).expect("authenticator");
    let debug = format!("{auth:?}");
    assert!(debug.contains("keys: 1"), "{debug}");
    assert!(!debug.contains("MII"), "{debug}");
}

#[tokio::test]
async fn a_connection_memo_answers_its_last_token_until_the_keys_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, old_pub) = Signer::ec();
    let (_, new_pub) = Signer::ec();
    let reviewer = FakeReviewer::new(Ok(Some(fixture_identity())), false);
    let auth = reviewed(
        sa_config(vec![write(dir.path(), "sa.pub", &old_pub)]),
        &reviewer,
    );
    let memo = TokenMemo::default();
    let token = old.sign(&fixture_claims());
    let first = on_memo(&auth, &memo, &token).await.expect("valid token");
    let again = on_memo(&auth, &memo, &token).await.expect("memo");
    assert!(
        Arc::ptr_eq(&first, &again),
        "the memo answers with the same identity"
    );
    // Another token on the same connection is verified on its own.
    let other = old.sign(&pod_claims());
    let got = on_memo(&auth, &memo, &other).await.expect("valid token");
    assert_ne!(*got, *first);
    // A withdrawn key stops the memo's answer at once, as it does the cache's.
    on_memo(&auth, &memo, &token).await.expect("valid token");
    write(dir.path(), "sa.pub", &new_pub);
    auth.reload_keys().expect("reload");
    let reason = invalid_reason(on_memo(&auth, &memo, &token).await);
    assert!(reason.contains("signature"), "{reason}");
    assert_eq!(reviewer.calls(), 0, "local tokens never reach TokenReview");
}

/// A request on the connection whose memo is `memo`, arriving now.
async fn on_memo(
    auth: &Authenticator,
    memo: &TokenMemo,
    token: &str,
) -> Result<Arc<Identity>, AuthError> {
    auth.authenticate_on(Some(memo), None, &bearer(token), std::time::Instant::now())
        .await
}

fn short_rsa_signer(kid: Option<String>) -> Signer {
    Signer {
        key: EncodingKey::from_rsa_pem(SHORT_RSA_PRIVATE_PEM.as_bytes()).expect("rsa pem"),
        alg: Algorithm::RS256,
        kid,
    }
}

/// An apiserver on Go 1.23 or older accepts 1,024-bit ServiceAccount keys,
/// which ring cannot verify with: such a key loads (with a warning) but is
/// not used here, and a token it may have signed is asked about upstream,
/// once per TTL like any reviewed token.
#[tokio::test]
async fn a_token_of_an_rsa_key_under_2048_bits_goes_to_token_review() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, pem) in [
        ("short.pub", SHORT_RSA_PUBLIC_PEM),
        ("short-pkcs1.pub", SHORT_RSA_PKCS1_PEM),
    ] {
        let reviewer = FakeReviewer::new(Ok(Some(fixture_identity())), false);
        let (_, ec_public) = Signer::ec();
        let files = vec![
            write(dir.path(), name, pem),
            write(dir.path(), "ec.pub", &ec_public),
        ];
        let auth = reviewed(sa_config(files), &reviewer);
        let token = short_rsa_signer(None).sign(&fixture_claims());
        for _ in 0..2 {
            let got = auth
                .authenticate(None, &bearer(&token))
                .await
                .expect("reviewed");
            assert_eq!(*got, fixture_identity(), "{name}");
        }
        assert_eq!(reviewer.calls(), 1, "{name}: one review, then its cache");
    }
}

/// Without TokenReview there is nothing to ask: the token is refused, and
/// the reason names the key size.
#[tokio::test]
async fn without_token_review_a_token_of_a_short_rsa_key_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = Authenticator::new(
        sa_config(vec![write(dir.path(), "short.pub", SHORT_RSA_PKCS1_PEM)]),
        None,
    )
    .expect("a file of short keys only still loads");
    let token = short_rsa_signer(None).sign(&fixture_claims());
    let reason = invalid_reason(auth.authenticate(None, &bearer(&token)).await);
    assert!(reason.contains("under 2048 bits"), "{reason}");
}

/// A token whose kid names a usable key was that key's to verify: if it
/// fails, it is refused as before, never reviewed.
#[tokio::test]
async fn a_token_whose_kid_names_a_usable_key_that_refuses_it_is_not_reviewed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reviewer = FakeReviewer::new(Ok(Some(fixture_identity())), false);
    let files = vec![
        write(dir.path(), "rsa.pub", RSA_PUBLIC_PEM),
        write(dir.path(), "short.pub", SHORT_RSA_PUBLIC_PEM),
    ];
    let auth = reviewed(sa_config(files), &reviewer);
    let (_, spki) = x509_parser::pem::parse_x509_pem(RSA_PUBLIC_PEM.as_bytes()).expect("pem");
    let kid = {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sha2::Sha256::digest(&spki.contents))
    };
    let token = short_rsa_signer(Some(kid)).sign(&fixture_claims());
    let reason = invalid_reason(auth.authenticate(None, &bearer(&token)).await);
    assert!(reason.contains("signature verification failed"), "{reason}");
    assert_eq!(reviewer.calls(), 0);
    // The 2,048-bit key is still used locally.
    let good = Signer::rsa(Algorithm::RS256).sign(&fixture_claims());
    assert_eq!(
        *auth
            .authenticate(None, &bearer(&good))
            .await
            .expect("valid"),
        fixture_identity()
    );
}
