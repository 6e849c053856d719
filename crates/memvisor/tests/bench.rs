//! `memvisor bench pagestore` runs end to end and prints every figure against its baseline.

use std::process::Command;

#[test]
fn bench_pagestore_prints_ratios_against_its_baselines() {
    // The test binary itself is a live process with real pages.
    let me = format!("pid:{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args([
            "bench",
            "pagestore",
            "--runs",
            "1",
            "--max-pages",
            "3000",
            &me,
        ])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "x memcpy",
        "of lz4_flex",
        "memvisor / sharing only",
        "memvisor / LZ4 only",
        "xor-rle",
        "copy-insert",
    ] {
        assert!(s.contains(want), "missing {want:?} in\n{s}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args([
            "bench",
            "pagestore",
            "--json",
            "--runs",
            "1",
            "--max-pages",
            "2000",
            &me,
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages = v["pages"].as_u64().unwrap();
    assert!((1..=2000).contains(&pages), "{pages}");
    assert!(v["memcpy_gbps"]["median"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_tmem_measures_every_target_against_memcached_and_redis() {
    let me = format!("pid:{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args([
            "bench",
            "tmem",
            "--json",
            "--runs",
            "1",
            "--clients",
            "2",
            "--max-pages",
            "2000",
            &me,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 5, "{v}");
    for t in targets {
        for op in ["put", "get", "flush"] {
            assert!(t[op]["ops_per_s"].as_f64().unwrap() > 0.0, "{t}");
        }
    }
    // Every page came back byte for byte (the bench checks each get), and the local
    // pagestore held the pages in less than memcached's slabs did.
    let held = |name: &str| {
        targets
            .iter()
            .find(|t| t["name"].as_str().unwrap().contains(name))
            .unwrap()["held_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(held("local pagestore") > 0);
    // Counted once the server had encoded every page it took raw (write-back is on).
    assert_eq!(v["write_back"].as_u64(), Some(16_384), "{v}");
    assert!(held("local pagestore") < held("memcached, straight"), "{v}");
    assert!(
        v["redis_durability"]
            .as_str()
            .unwrap()
            .contains("appendonly")
    );
}
