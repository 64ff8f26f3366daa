//! Regression datasets through the public API: f32 targets `[k]` written,
//! read back and validated (manifest schema, shard dtype and shape,
//! finiteness), packing from a space-delimited table with its targets in a
//! separate file (scikit-learn's diabetes layout), from target columns, and
//! from NPY; and the classification manifest of before still reading.

use std::path::{Path, PathBuf};

use ringmaster_dataset::{
    Dataset, DatasetManifest, LabelColumn, LabelKind, LabelRows, Labels, Missing, PackInput,
    PackOptions, PackTask, SynthRegression, WriteOptions, pack, synthesize_regression,
    write_dataset,
};
use sha2::Digest;

fn write_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn options(input: PackInput, output: &Path, task: PackTask) -> PackOptions {
    PackOptions {
        missing: Missing::Error,
        dedup: false,
        input,
        task,
        output: output.into(),
        name: "r".into(),
        val_fraction: 0.0,
        standardize: false,
        shard_samples: Some(2),
        seed: 1,
        show_progress: false,
    }
}

fn targets_opts(k: usize) -> WriteOptions {
    WriteOptions {
        image: None,
        name: "r".into(),
        features: 2,
        labels: LabelKind::Targets(k),
        shard_samples: 2,
        standardization: None,
        source: None,
        tokenizer: None,
    }
}

#[test]
fn targets_round_trip_with_their_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let y = [0.5f32, -1.0, 2.5, 3.0, -7.25, 1e3];
    let rows = LabelRows::Targets {
        width: 2,
        values: &y,
    };
    let manifest = write_dataset(&dir, &targets_opts(2), &x, rows).unwrap();
    assert_eq!(manifest.labels(), LabelKind::Targets(2));
    assert_eq!(manifest.schema.num_classes, None);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("MANIFEST.json")).unwrap()).unwrap();
    assert_eq!(
        json["schema"]["labels"],
        serde_json::json!({"name": "y", "dtype": "f32", "shape": [2]})
    );
    assert!(json["schema"].get("num_classes").is_none(), "{json}");

    let ds = Dataset::load(&dir).unwrap();
    assert_eq!(
        ds.y,
        Labels::Targets {
            width: 2,
            values: y.to_vec()
        }
    );
    assert_eq!(ds.len(), 3);
    assert_eq!(
        ds.sample(1),
        Some((
            &[3.0f32, 4.0][..],
            LabelRows::Targets {
                width: 2,
                values: &[2.5, 3.0]
            }
        ))
    );
    // Decoded size counts 4 bytes per target, not an 8-byte label.
    assert_eq!(manifest.decoded_bytes(), 3 * (2 * 4 + 2 * 4));

    // Non-finite targets are refused before anything is written.
    let bad = [0.5f32, f32::NAN, 1.0, 1.0, 1.0, 1.0];
    let err = write_dataset(
        &tmp.path().join("bad"),
        &targets_opts(2),
        &x,
        LabelRows::Targets {
            width: 2,
            values: &bad,
        },
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: sample 0 has a non-finite target"
    );
    assert!(!tmp.path().join("bad").exists());
    // Class labels given for a regression dataset are refused by name.
    let err = write_dataset(
        &tmp.path().join("bad"),
        &targets_opts(1),
        &x,
        LabelRows::Classes(&[0, 1, 0]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: the dataset holds regression targets (1 per sample), but the samples \
         given have class labels"
    );
}

/// Rewrites the manifest in `dir` through `edit` on its JSON.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("MANIFEST.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn regression_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("ds");
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let y = [0.5f32, -1.0, 2.5];
    let rows = LabelRows::Targets {
        width: 1,
        values: &y,
    };
    write_dataset(&dir, &targets_opts(1), &x, rows).unwrap();
    dir
}

#[track_caller]
fn check_manifest_error(edit: impl FnOnce(&mut serde_json::Value), expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = regression_dir(tmp.path());
    edit_manifest(&dir, edit);
    let err = DatasetManifest::read(&dir).unwrap_err().to_string();
    assert_eq!(err, format!("invalid manifest: {expected}"));
}

#[test]
fn regression_manifests_are_validated() {
    check_manifest_error(
        |v| v["schema"]["num_classes"] = 3.into(),
        "num_classes (3) does not apply to regression targets (f32 `y`)",
    );
    check_manifest_error(
        |v| v["schema"]["labels"]["shape"] = serde_json::json!([0]),
        "regression targets (f32 `y`) need at least one target per sample",
    );
    check_manifest_error(
        |v| v["schema"]["labels"]["shape"] = serde_json::json!([]),
        "schema tensor `y` (f32, 0 dims) must be `y` (f32, 1 dims)",
    );
    check_manifest_error(
        |v| v["schema"]["labels"]["dtype"] = "i64".into(),
        // An i64 `y` of shape [k] is a token sequence, whose vocabulary is missing here.
        "token sequences (i64 `y` of shape [T]) need num_classes (the vocabulary)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = regression_dir(tmp.path());
    edit_manifest(&dir, |v| {
        v["schema"]["labels"]["shape"] = serde_json::json!([100_000])
    });
    assert_eq!(
        DatasetManifest::read(&dir).unwrap_err().to_string(),
        "targets per sample is 100000, above the limit of 65536"
    );
    // Class labels with no num_classes are refused too.
    edit_manifest(&dir, |v| {
        v["schema"]["labels"] = serde_json::json!({"name": "y", "dtype": "i64", "shape": []})
    });
    assert_eq!(
        DatasetManifest::read(&dir).unwrap_err().to_string(),
        "invalid manifest: class labels (i64 `y`) need num_classes"
    );
}

#[test]
fn a_classification_manifest_of_before_reads_unchanged() {
    // A manifest exactly as version 1 wrote it before regression existed.
    let tmp = tempfile::tempdir().unwrap();
    let x: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let y: Vec<u8> = [1i64].iter().flat_map(|v| v.to_le_bytes()).collect();
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = safetensors::serialize(
        [
            ("x", TensorView::new(Dtype::F32, vec![1, 2], &x).unwrap()),
            ("y", TensorView::new(Dtype::I64, vec![1], &y).unwrap()),
        ],
        None,
    )
    .unwrap();
    std::fs::write(tmp.path().join("shard-00000.safetensors"), &bytes).unwrap();
    let manifest = format!(
        r#"{{"format_version": 1, "name": "old",
            "schema": {{"features": {{"name": "x", "dtype": "f32", "shape": [2]}},
                        "labels": {{"name": "y", "dtype": "i64", "shape": []}},
                        "num_classes": 2}},
            "num_samples": 1,
            "shards": [{{"file": "shard-00000.safetensors", "samples": 1, "sha256": "{}"}}]}}"#,
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    std::fs::write(tmp.path().join("MANIFEST.json"), manifest).unwrap();
    let ds = Dataset::load(tmp.path()).unwrap();
    assert_eq!(ds.manifest.labels(), LabelKind::Classes(2));
    assert_eq!(ds.y, Labels::Classes(vec![1]));
    // Written again, a classification schema keeps `num_classes` as before.
    let json = serde_json::to_value(&ds.manifest.schema).unwrap();
    assert_eq!(json["num_classes"], 2);
}

#[test]
fn shards_with_non_finite_or_misshapen_targets_fail_naming_the_shard() {
    use safetensors::tensor::{Dtype, TensorView};
    let tmp = tempfile::tempdir().unwrap();
    let dir = regression_dir(tmp.path());
    let shard = dir.join("shard-00000.safetensors");
    let replace = |y: &[f32], shape: Vec<usize>| {
        let xb: Vec<u8> = [0.0f32, 1.0, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let yb: Vec<u8> = y.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = safetensors::serialize(
            [
                ("x", TensorView::new(Dtype::F32, vec![2, 2], &xb).unwrap()),
                ("y", TensorView::new(Dtype::F32, shape, &yb).unwrap()),
            ],
            None,
        )
        .unwrap();
        std::fs::write(&shard, &bytes).unwrap();
        let hash = hex::encode(sha2::Sha256::digest(&bytes));
        edit_manifest(&dir, |v| v["shards"][0]["sha256"] = hash.into());
        Dataset::load(&dir).unwrap_err().to_string()
    };
    assert_eq!(
        replace(&[1.0, f32::INFINITY], vec![2, 1]),
        format!(
            "shard {}: sample 1 has a non-finite regression target",
            shard.display()
        )
    );
    assert_eq!(
        replace(&[1.0, 2.0], vec![2]),
        format!(
            "shard {}: tensor `y` is F32 [2], the schema requires F32 [2, 1]",
            shard.display()
        )
    );
}

/// The layout of scikit-learn's `diabetes_data_raw.csv.gz` and
/// `diabetes_target.csv.gz`: space-delimited features, no header, and the
/// target in a file of its own.
#[test]
fn packs_space_delimited_features_with_targets_from_another_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_file(
        tmp.path(),
        "data.csv",
        b"59 2 32.1\n48 1 21.6\n72 2 30.5\n24 1 25.3\n",
    );
    let target = write_file(
        tmp.path(),
        "target.csv",
        b"1.510000000000000000e+02\n7.5e+01\n141\n206\n",
    );
    let input = |labels: &Path| PackInput::Csv {
        path: data.clone(),
        label_column: LabelColumn::Last,
        has_header: None,
        skip_rows: 0,
        delimiter: b' ',
        labels: Some(labels.into()),
    };
    let out = tmp.path().join("out");
    let report = pack(&options(input(&target), &out, PackTask::Regression)).unwrap();
    assert_eq!(
        (report.train_samples, report.features, report.labels),
        (4, 3, LabelKind::Targets(1))
    );
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(
        ds.x,
        [
            59.0, 2.0, 32.1, 48.0, 1.0, 21.6, 72.0, 2.0, 30.5, 24.0, 1.0, 25.3
        ]
    );
    assert_eq!(ds.y.targets(), Some(&[151.0f32, 75.0, 141.0, 206.0][..]));
    let source = ds.manifest.source.unwrap();
    assert!(
        source.contains("space-delimited") && source.contains("target.csv"),
        "{source}"
    );

    // A labels file of another length is refused with both counts.
    let short = write_file(tmp.path(), "short.csv", b"1\n2\n");
    let err = pack(&options(
        input(&short),
        &tmp.path().join("o2"),
        PackTask::Regression,
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid input: {} has 4 rows but {} has 2: the labels file needs one row per sample",
            data.display(),
            short.display()
        )
    );
    // Read as commas, a space-delimited table is one field a row: say why.
    let err = pack(&options(
        PackInput::Csv {
            path: data.clone(),
            label_column: LabelColumn::Last,
            has_header: None,
            skip_rows: 0,
            delimiter: b',',
            labels: Some(target.clone()),
        },
        &tmp.path().join("o4"),
        PackTask::Regression,
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid input: {}: the first row is one field of numbers separated by spaces: \
             give --delimiter space",
            data.display()
        )
    );
    // A non-finite target points at its line and column.
    let bad = write_file(tmp.path(), "bad.csv", b"1\n2\ninf\n4\n");
    let err = pack(&options(
        input(&bad),
        &tmp.path().join("o3"),
        PackTask::Regression,
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:3: column 1: `inf` is not a finite number",
            bad.display()
        )
    );
}

#[test]
fn packs_several_target_columns_by_name_and_refuses_them_for_classification() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(
        tmp.path(),
        "t.csv",
        b"a,w,b,h\n1,0.5,2,10\n3,1.5,4,20\n5,2.5,6,30\n",
    );
    let input = PackInput::Csv {
        path: csv.clone(),
        label_column: "h,w".parse().unwrap(),
        has_header: None,
        skip_rows: 0,
        delimiter: b',',
        labels: None,
    };
    let out = tmp.path().join("out");
    let report = pack(&options(input.clone(), &out, PackTask::Regression)).unwrap();
    assert_eq!(report.labels, LabelKind::Targets(2));
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // Targets keep the file's column order (w before h), whatever order the
    // list names them in.
    assert_eq!(
        ds.y.targets(),
        Some(&[0.5f32, 10.0, 1.5, 20.0, 2.5, 30.0][..])
    );

    let err = pack(&options(
        input,
        &tmp.path().join("c"),
        PackTask::Classification,
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: a classification dataset has one label column, found 2; several columns are \
             regression targets (--task regression)",
            csv.display()
        )
    );
}

#[test]
fn packs_npy_targets_of_one_or_two_dimensions() {
    let tmp = tempfile::tempdir().unwrap();
    let x = tmp.path().join("x.npy");
    use npyz::WriterBuilder;
    let write = |path: &Path, shape: &[u64], values: &[f64]| {
        let mut out = npyz::WriteOptions::new()
            .default_dtype()
            .shape(shape)
            .writer(std::fs::File::create(path).unwrap())
            .begin_nd()
            .unwrap();
        out.extend(values.iter().copied()).unwrap();
        out.finish().unwrap();
    };
    write(&x, &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let y1 = tmp.path().join("y1.npy");
    write(&y1, &[3], &[0.5, 1.5, 2.5]);
    let y2 = tmp.path().join("y2.npy");
    write(&y2, &[3, 2], &[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
    for (labels, k) in [(&y1, 1), (&y2, 2)] {
        let out = tmp.path().join(format!("out{k}"));
        let input = PackInput::Npy {
            features: x.clone(),
            labels: labels.clone(),
        };
        let report = pack(&options(input, &out, PackTask::Regression)).unwrap();
        assert_eq!(report.labels, LabelKind::Targets(k));
        let ds = Dataset::load(&out.join("train")).unwrap();
        assert_eq!(ds.y.targets().unwrap().len(), 3 * k);
    }
}

#[test]
fn synthetic_regression_is_deterministic_and_learnable() {
    let tmp = tempfile::tempdir().unwrap();
    let make = |name: &str, seed| {
        let dir = tmp.path().join(name);
        synthesize_regression(&SynthRegression {
            output: dir.clone(),
            name: name.into(),
            samples: 500,
            features: 4,
            targets: 2,
            seed,
            shard_samples: 128,
        })
        .unwrap();
        Dataset::load(&dir).unwrap()
    };
    let a = make("a", 3);
    assert_eq!(a.manifest.labels(), LabelKind::Targets(2));
    assert_eq!(a.manifest.shards.len(), 4);
    assert_eq!((a.x.clone(), a.y.clone()), {
        let b = make("b", 3);
        (b.x, b.y)
    });
    assert_ne!(a.y, make("c", 4).y);
    // The targets vary far more than the noise: there is signal to learn.
    let t = a.y.targets().unwrap();
    let mean = t.iter().map(|&v| f64::from(v)).sum::<f64>() / t.len() as f64;
    let var = t
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / t.len() as f64;
    assert!(var > 0.5, "target variance {var}");
}
