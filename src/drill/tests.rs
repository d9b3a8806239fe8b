//! Drill checks and lifetimes. The active set is process-wide, so these tests use upstream
//! names no other test uses, and only one of them starts drills.

use std::time::Duration;

use super::*;

fn drills(max_duration_ms: u64) -> (Drills, Registry, watch::Sender<bool>) {
    let registry = Registry::new();
    let metrics = DrillMetrics::register(&registry).unwrap();
    let (tx, rx) = watch::channel(false);
    let config = DrillsConfig {
        enabled: true,
        max_duration_ms,
    };
    (Drills::start(config, metrics, rx), registry, tx)
}

fn spec(kind: Kind) -> Spec {
    Spec {
        upstream: "drill-check".into(),
        kind,
        share: 1.0,
        duration_ms: 1_000,
        delay_ms: None,
        reply: None,
    }
}

fn gauge(r: &Registry, name: &str) -> f64 {
    r.gather()
        .iter()
        .find(|f| f.name() == name)
        .map(|f| f.get_metric()[0].get_gauge().get_value())
        .unwrap()
}

#[test]
fn config_needs_the_admin_token_and_a_bound() {
    assert_eq!(DrillsConfig::default().validate(false), Ok(()));
    let on = DrillsConfig {
        enabled: true,
        ..DrillsConfig::default()
    };
    assert_eq!(on.validate(false).unwrap_err().0, "drills.enabled");
    assert_eq!(on.validate(true), Ok(()));
    let unbounded = DrillsConfig {
        max_duration_ms: 0,
        ..DrillsConfig::default()
    };
    assert_eq!(
        unbounded.validate(true).unwrap_err().0,
        "drills.max_duration_ms"
    );
}

#[tokio::test]
async fn bad_drills_are_refused_with_the_reason() {
    let (d, _r, _stop) = drills(60_000);
    let up = ["drill-check"];
    let err = |s: Spec| d.add(s, &up).unwrap_err().to_string();
    assert!(
        err(Spec {
            share: 0.0,
            ..spec(Kind::Error)
        })
        .contains("share")
    );
    assert!(
        err(Spec {
            share: 1.5,
            ..spec(Kind::Error)
        })
        .contains("share")
    );
    assert!(
        err(Spec {
            duration_ms: 0,
            ..spec(Kind::Error)
        })
        .contains("duration_ms")
    );
    assert!(
        err(Spec {
            duration_ms: 60_001,
            ..spec(Kind::Error)
        })
        .contains("drills.max_duration_ms")
    );
    assert!(err(spec(Kind::Delay)).contains("delay_ms"));
    assert!(
        err(Spec {
            delay_ms: Some(5),
            ..spec(Kind::Refuse)
        })
        .contains("delay_ms")
    );
    assert!(
        err(Spec {
            reply: Some("+OK".into()),
            ..spec(Kind::Error)
        })
        .contains("reply")
    );
    assert!(
        err(Spec {
            reply: Some("-A\r\n-B".into()),
            ..spec(Kind::Error)
        })
        .contains("reply")
    );
    assert!(
        err(Spec {
            reply: Some("-X".into()),
            ..spec(Kind::Refuse)
        })
        .contains("reply")
    );
    assert_eq!(
        d.add(
            Spec {
                upstream: "nope".into(),
                ..spec(Kind::Error)
            },
            &up
        )
        .unwrap_err(),
        DrillError::UnknownUpstream("nope".into())
    );
    let parsed: Result<Spec, _> = serde_json::from_str(
        r#"{"upstream":"u","kind":"error","share":1,"duration_ms":5,"extra":1}"#,
    );
    assert!(parsed.is_err(), "unknown fields are refused");
    let parsed: Result<Spec, _> =
        serde_json::from_str(r#"{"upstream":"u","kind":"error","share":1}"#);
    assert!(
        parsed.unwrap_err().to_string().contains("duration_ms"),
        "required"
    );
}

#[tokio::test(start_paused = true)]
async fn drills_end_on_time_or_when_cleared() {
    let (d, registry, _stop) = drills(60_000);
    let up = ["drill-life"];
    let a = d
        .add(
            Spec {
                upstream: "drill-life".into(),
                reply: Some("-MASTERDOWN drill".into()),
                ..spec(Kind::Error)
            },
            &up,
        )
        .unwrap();
    let b = d
        .add(
            Spec {
                upstream: "drill-life".into(),
                duration_ms: 5_000,
                delay_ms: Some(50),
                ..spec(Kind::Delay)
            },
            &up,
        )
        .unwrap();
    assert!(inject::armed());
    assert_eq!(gauge(&registry, "redfuse_drills_active"), 2.0);
    assert_eq!(a.view()["reply"], "-MASTERDOWN drill");
    assert_eq!(b.view()["delay_ms"], 50);
    assert_eq!(
        inject::pick("drill-life").map(|p| p.id),
        Some(a.id),
        "first wins"
    );
    assert!(inject::pick("drill-other").is_none());

    tokio::time::sleep(Duration::from_millis(1_001)).await;
    let left: Vec<u64> = d.list().iter().map(|x| x.id).collect();
    assert_eq!(left, vec![b.id], "the first expired");
    assert_eq!(gauge(&registry, "redfuse_drills_active"), 1.0);
    assert_eq!(inject::pick("drill-life").map(|p| p.id), Some(b.id));

    assert_eq!(d.clear(), 1);
    assert!(d.list().is_empty());
    assert!(
        !inject::armed(),
        "nothing active: the data path skips drills"
    );
    assert_eq!(gauge(&registry, "redfuse_drills_active"), 0.0);
}
