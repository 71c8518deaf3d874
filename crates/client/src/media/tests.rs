use std::sync::atomic::AtomicBool;

use super::*;

#[test]
fn media_ids_are_64_lowercase_hex() {
    assert!(check_id(&"ab".repeat(32)).is_ok());
    for bad in [
        "",
        "AB".repeat(32).as_str(),
        "ab".repeat(31).as_str(),
        "ab".repeat(33).as_str(),
        &format!("../{}", "a".repeat(61)),
        &format!("{}/x", "a".repeat(62)),
    ] {
        assert!(
            matches!(
                check_id(bad),
                Err(Error::Media(MediaError::BadReference(_)))
            ),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_busy_key_waits_for_its_holder() {
    let busy = Arc::new(Busy::default());
    let first = busy.acquire("send:/a".into()).await;
    // Another key is free.
    drop(busy.acquire("send:/b".into()).await);
    assert_eq!(busy.held(), ["send:/a"]);

    let released = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (busy, released) = (busy.clone(), released.clone());
        tokio::spawn(async move {
            let _second = busy.acquire("send:/a".into()).await;
            released.load(Ordering::SeqCst)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the second holder waits");
    released.store(true, Ordering::SeqCst);
    drop(first);
    let saw_release = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken")
        .expect("task");
    assert!(saw_release);
    assert!(busy.held().is_empty());
}

#[tokio::test]
async fn blocking_work_reports_progress_in_order() {
    let seen = Mutex::new(Vec::new());
    let out = blocking(
        Phase::Encrypting,
        3,
        &|p: Progress| lock(&seen).push((p.phase, p.done, p.total)),
        |tick| {
            for done in 1..=3 {
                tick.0.send_replace(done);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(7)
        },
    )
    .await
    .expect("work");
    assert_eq!(out, 7);
    let seen = lock(&seen).clone();
    assert!(!seen.is_empty());
    assert!(seen.windows(2).all(|w| w[0].1 <= w[1].1), "{seen:?}");
    assert!(
        seen.iter()
            .all(|(p, _, t)| *p == Phase::Encrypting && *t == 3)
    );

    let err = blocking(Phase::Decrypting, 1, &|_| {}, |_| -> Result<(), Error> {
        Err(Error::Media(MediaError::NotMedia))
    })
    .await;
    assert!(matches!(err, Err(Error::Media(MediaError::NotMedia))));
}

#[test]
fn phases_and_errors_have_stable_names() {
    let json = serde_json::to_string(&Progress {
        phase: Phase::Uploading,
        done: 1,
        total: 2,
    })
    .expect("json");
    assert_eq!(json, r#"{"phase":"uploading","done":1,"total":2}"#);
    assert_eq!(Phase::Decrypting.as_str(), "decrypting");
    assert_eq!(
        Error::Media(MediaError::Tampered("x".into())).code_str(),
        "tampered"
    );
    assert_eq!(Error::Media(MediaError::NotMedia).code_str(), "not_media");
    assert_eq!(Recipient::user("bob"), Recipient::User("bob".into()));
    assert_eq!(Recipient::group(5), Recipient::Group(5));
}
