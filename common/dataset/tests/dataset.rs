//! Datasets end to end through the public API: packing CSV (plain, gzip,
//! with and without header) and NPY, standardization fitted on train only,
//! exact error lines for malformed input, and loading that refuses tampered
//! shards and unsafe manifests.

use std::io::Write;
use std::path::{Path, PathBuf};

use ringmaster_dataset::{
    Dataset, DatasetError, DatasetManifest, LabelColumn, LabelKind, LabelRows, Labels, Missing,
    PackInput, PackOptions, PackTask, SynthOptions, WriteOptions, pack, synthesize, write_dataset,
};
use sha2::Digest;

fn write_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn options(input: PackInput, output: &Path) -> PackOptions {
    PackOptions {
        missing: Missing::Error,
        dedup: false,
        input,
        task: PackTask::Classification,
        output: output.into(),
        name: "t".into(),
        val_fraction: 0.0,
        standardize: false,
        shard_samples: Some(2),
        seed: 1,
        show_progress: false,
    }
}

fn csv_input(path: &Path, label_column: LabelColumn, has_header: Option<bool>) -> PackInput {
    PackInput::Csv {
        path: path.into(),
        label_column,
        has_header,
        skip_rows: 0,
        delimiter: b',',
        labels: None,
    }
}

/// Shaped like scikit-learn's `breast_cancer.csv` and `wine_data.csv`: a first
/// line of sample count, feature count and class names, then rows of
/// features and the label, no header.
const SKLEARN_SHAPED: &[u8] = b"4,3,malignant,benign\n\
    17.99,10.38,122.8,0\n\
    20.57,17.77,132.9,0\n\
    13.54,14.36,87.46,1\n\
    7.76,24.54,47.92,1\n";

#[test]
fn skip_rows_reads_scikit_learn_shaped_csv() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(tmp.path(), "breast_cancer.csv", SKLEARN_SHAPED);
    let out = tmp.path().join("out");
    let input = PackInput::Csv {
        path: csv.clone(),
        label_column: LabelColumn::Last,
        has_header: None,
        skip_rows: 1,
        delimiter: b',',
        labels: None,
    };
    let report = pack(&options(input, &out)).unwrap();
    assert_eq!(
        (report.train_samples, report.features, report.labels),
        (4, 3, LabelKind::Classes(2))
    );
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(
        ds.x,
        [
            17.99, 10.38, 122.8, 20.57, 17.77, 132.9, 13.54, 14.36, 87.46, 7.76, 24.54, 47.92
        ]
    );
    assert_eq!(ds.y, Labels::Classes(vec![0, 0, 1, 1]));
    let source = ds.manifest.source.unwrap();
    assert!(source.contains("first line skipped, no header"), "{source}");

    // Gzip too: lines are skipped after decompression.
    let gz = write_file(tmp.path(), "wine.csv.gz", &gzip(SKLEARN_SHAPED));
    let input = PackInput::Csv {
        path: gz,
        label_column: LabelColumn::Last,
        has_header: None,
        skip_rows: 1,
        delimiter: b',',
        labels: None,
    };
    let report = pack(&options(input, &tmp.path().join("gz"))).unwrap();
    assert_eq!((report.train_samples, report.features), (4, 3));
}

#[test]
fn skip_rows_then_header_and_lines_count_from_the_top() {
    let tmp = tempfile::tempdir().unwrap();
    // Two lines of preamble that are not CSV at all, then a header.
    let text = b"exported by \"some tool\", v2\n# units: cm\nlabel,a,b\n1,0.5,2\n0,1.5,x\n";
    let csv = write_file(tmp.path(), "t.csv", text);
    let input = |skip_rows| PackInput::Csv {
        path: csv.clone(),
        label_column: LabelColumn::Name("label".into()),
        has_header: None,
        skip_rows,
        delimiter: b',',
        labels: None,
    };
    let err = pack(&options(input(2), &tmp.path().join("o")))
        .unwrap_err()
        .to_string();
    // The bad value is on line 5 of the file, though the 3rd line read as CSV.
    assert_eq!(
        err,
        format!(
            "{}:5: column 3: cannot parse `x` as a number",
            csv.display()
        )
    );

    let fixed = write_file(
        tmp.path(),
        "u.csv",
        b"exported by \"some tool\", v2\n# units: cm\nlabel,a,b\n1,0.5,2\n0,1.5,3\n",
    );
    let input = PackInput::Csv {
        path: fixed,
        label_column: LabelColumn::Name("label".into()),
        has_header: None,
        skip_rows: 2,
        delimiter: b',',
        labels: None,
    };
    let out = tmp.path().join("u");
    pack(&options(input, &out)).unwrap();
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [0.5, 2.0, 1.5, 3.0]);
    assert_eq!(ds.y, Labels::Classes(vec![1, 0]));
}

#[test]
fn a_preamble_taken_for_a_header_suggests_skip_rows() {
    // Without --skip-rows the line of counts and class names reads as a header;
    // its width differs from the rows', which gives it away (as in
    // breast_cancer.csv: 4 fields, then rows of 31).
    let text = b"2,4,malignant,benign\n1,2,3,4,0\n5,6,7,8,1\n";
    check_csv_error(
        "breast_cancer.csv",
        text,
        LabelColumn::Last,
        ":2: expected 4 fields like the header on line 1, found 5; if the lines above the \
         table are not column names, skip them (--skip-rows N)",
    );

    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(tmp.path(), "t.csv", b"a,b,label\n1,2,0\n");
    let input = PackInput::Csv {
        path: csv.clone(),
        label_column: LabelColumn::Last,
        has_header: None,
        skip_rows: 3,
        delimiter: b',',
        labels: None,
    };
    let err = pack(&options(input, &tmp.path().join("o")))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "invalid input: {}: skipping 3 leading lines leaves no data: the file has 2",
            csv.display()
        )
    );
}

#[test]
fn csv_with_header_packs_exact_values() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(
        tmp.path(),
        "t.csv",
        b"a,label,b\n1,0,2\n3.5,1, -4\n5,2.0,6e1\n",
    );
    let out = tmp.path().join("out");
    let opts = options(
        csv_input(&csv, LabelColumn::Name("label".into()), None),
        &out,
    );
    let report = pack(&opts).unwrap();
    assert_eq!(
        (report.train_samples, report.val_samples, report.features),
        (3, 0, 2)
    );
    assert_eq!(
        (report.labels, report.train_shards),
        (LabelKind::Classes(3), 2)
    );
    assert_eq!(report.val_dir, None);
    assert!(!out.join("val").exists());

    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [1.0, 2.0, 3.5, -4.0, 5.0, 60.0]);
    assert_eq!(ds.y, Labels::Classes(vec![0, 1, 2]));
    assert_eq!(ds.features, 2);
    assert_eq!(ds.manifest.schema.num_classes, Some(3));
    assert_eq!(ds.manifest.standardization, None);
    assert_eq!(
        ds.sample(1),
        Some((&[3.5f32, -4.0][..], LabelRows::Classes(&[1])))
    );
}

#[test]
fn gzip_csv_without_header_is_detected_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    // No `.gz` suffix: gzip is recognised by its magic bytes.
    let csv = write_file(tmp.path(), "t.csv", &gzip(b"0,1.5,2\n1.0,3,4\n1,-1,0\n"));
    let out = tmp.path().join("out");
    pack(&options(csv_input(&csv, LabelColumn::First, None), &out)).unwrap();
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [1.5, 2.0, 3.0, 4.0, -1.0, 0.0]);
    assert_eq!(ds.y, Labels::Classes(vec![0, 1, 1]));
    assert!(ds.manifest.source.unwrap().contains("gzip"));
}

#[test]
fn forced_header_and_label_index() {
    let tmp = tempfile::tempdir().unwrap();
    // Numeric first row, declared a header: it is skipped.
    let csv = write_file(tmp.path(), "t.csv", b"9,9,9\n7,1,8\n6,0,5\n");
    let out = tmp.path().join("out");
    pack(&options(
        csv_input(&csv, LabelColumn::Index(1), Some(true)),
        &out,
    ))
    .unwrap();
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [7.0, 8.0, 6.0, 5.0]);
    assert_eq!(ds.y, Labels::Classes(vec![1, 0]));
}

#[track_caller]
fn check_csv_error(name: &str, contents: &[u8], label_column: LabelColumn, expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(tmp.path(), name, contents);
    let err = pack(&options(
        csv_input(&csv, label_column, None),
        &tmp.path().join("o"),
    ))
    .unwrap_err()
    .to_string();
    assert_eq!(err, format!("{}{expected}", csv.display()));
}

#[test]
fn malformed_csv_rows_name_file_line_and_column() {
    let rows = |n: usize| -> String {
        (0..n)
            .map(|i| format!("{},{}\n", vec!["1"; 64].join(","), i % 10))
            .collect()
    };
    let mut short = rows(16);
    short.push_str(&format!("{},3\n", vec!["1"; 63].join(",")));
    check_csv_error(
        "digits.csv",
        short.as_bytes(),
        LabelColumn::Last,
        ":17: expected 65 fields, found 64",
    );
    let mut bad = rows(16);
    bad.push_str(&format!("1,1,abc,{},3\n", vec!["1"; 61].join(",")));
    check_csv_error(
        "digits.csv",
        bad.as_bytes(),
        LabelColumn::Last,
        ":17: column 3: cannot parse `abc` as a number",
    );
    let last = LabelColumn::Last;
    check_csv_error(
        "t.csv",
        b"1,2,0\n1,NaN,1\n",
        last.clone(),
        // NaN is how tables write a missing value: the error says how to handle it.
        ":2: column 2: missing value `NaN`; choose --missing drop, mean or median to drop or \
         fill such rows",
    );
    check_csv_error(
        "t.csv",
        b"1,2,0\ninf,2,1\n",
        last.clone(),
        ":2: column 1: `inf` is not a finite number",
    );
    check_csv_error(
        "t.csv",
        b"1,2,0\n1,1e39,1\n",
        last.clone(),
        ":2: column 2: `1e39` is not a finite number",
    );
    check_csv_error(
        "t.csv",
        b"x,y,label\n1,2,0\n1,2,3.5\n",
        last.clone(),
        ":3: column 3: label `3.5` is not an integer in 0..1048576",
    );
    check_csv_error(
        "t.csv",
        b"1,2,0\n1,2,-1\n",
        last.clone(),
        ":2: column 3: label `-1` is not an integer in 0..1048576",
    );
    check_csv_error("t.csv", b"", last.clone(), ": no data rows");
    check_csv_error("t.csv", b"a,b,label\n", last.clone(), ": no data rows");
    check_csv_error(
        "t.csv",
        b"1,2,0\n",
        LabelColumn::Name("label".into()),
        ": label column `label` is given by name but the file has no header row",
    );
    check_csv_error(
        "t.csv",
        b"1,2,0\n",
        LabelColumn::Index(3),
        ": label column index 3 (0-based) is past the 3 fields of a row",
    );
}

#[test]
fn label_column_parses_from_the_command_line() {
    let parse = |s: &str| s.parse::<LabelColumn>().ok();
    assert_eq!(parse("first"), Some(LabelColumn::First));
    assert_eq!(parse("last"), Some(LabelColumn::Last));
    assert_eq!(parse("64"), Some(LabelColumn::Index(64)));
    assert_eq!(parse("target"), Some(LabelColumn::Name("target".into())));
    assert_eq!(parse(""), None);
}

#[test]
fn a_single_class_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let csv = write_file(tmp.path(), "t.csv", b"1,0\n2,0\n");
    let err = pack(&options(
        csv_input(&csv, LabelColumn::Last, None),
        &tmp.path().join("o"),
    ));
    assert!(matches!(err, Err(DatasetError::TooFewClasses)));
}

#[test]
fn standardization_is_fitted_on_train_and_applied_to_both_splits() {
    let tmp = tempfile::tempdir().unwrap();
    // 40 distinct rows; feature 2 is constant and must keep std 1.
    let raw: Vec<[f32; 3]> = (0..40)
        .map(|i| [i as f32 * 0.5 + 10.0, ((i * 7) % 13) as f32, 4.0])
        .collect();
    let text: String = raw
        .iter()
        .enumerate()
        .map(|(i, r)| format!("{},{},{},{}\n", r[0], r[1], r[2], i % 3))
        .collect();
    let csv = write_file(tmp.path(), "t.csv", text.as_bytes());
    let out = tmp.path().join("out");
    let mut opts = options(csv_input(&csv, LabelColumn::Last, Some(false)), &out);
    opts.val_fraction = 0.25;
    opts.standardize = true;
    opts.shard_samples = Some(7);
    let report = pack(&opts).unwrap();
    assert_eq!((report.train_samples, report.val_samples), (30, 10));
    assert_eq!((report.train_shards, report.val_shards), (5, 2));

    let train = Dataset::load(&out.join("train")).unwrap();
    let val = Dataset::load(&out.join("val")).unwrap();
    let st = train.manifest.standardization.clone().unwrap();
    assert_eq!(val.manifest.standardization.as_ref(), Some(&st));
    assert_eq!(st.std[2], 1.0);
    assert_eq!(st.mean[2], 4.0);

    // Stored train features have mean 0 and std 1 (except the constant one).
    for j in 0..3 {
        let col: Vec<f64> = train
            .x
            .iter()
            .skip(j)
            .step_by(3)
            .map(|&v| v.into())
            .collect();
        let mean = col.iter().sum::<f64>() / col.len() as f64;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / col.len() as f64;
        assert!(mean.abs() < 1e-5, "feature {j} mean {mean}");
        let expected_var = if j == 2 { 0.0 } else { 1.0 };
        assert!((var - expected_var).abs() < 1e-4, "feature {j} var {var}");
    }

    // Undoing the transform with the recorded (train) statistics gives back
    // the raw rows for both splits; raw values lie on a 0.5 grid.
    let undo = |ds: &Dataset| -> Vec<[f32; 3]> {
        let grid = |v: f32| (v * 2.0).round() / 2.0;
        ds.x.chunks(3)
            .map(|r| std::array::from_fn(|j| grid(r[j] * st.std[j] + st.mean[j])))
            .collect()
    };
    let train_raw = undo(&train);
    let mut recovered: Vec<[f32; 3]> = train_raw.iter().copied().chain(undo(&val)).collect();
    let key = |r: &[f32; 3]| (r[0].to_bits(), r[1].to_bits(), r[2].to_bits());
    recovered.sort_by_key(key);
    let mut expected = raw.clone();
    expected.sort_by_key(key);
    assert_eq!(recovered, expected);

    // The recorded mean is the train split's, not the whole input's.
    let train_mean0 = train_raw.iter().map(|r| f64::from(r[0])).sum::<f64>() / 30.0;
    assert!((f64::from(st.mean[0]) - train_mean0).abs() < 1e-4);
    let whole_mean0 = raw.iter().map(|r| f64::from(r[0])).sum::<f64>() / 40.0;
    assert!((train_mean0 - whole_mean0).abs() > 0.01);
}

#[test]
fn split_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..50).map(|i| format!("{i},{}\n", i % 2)).collect();
    let csv = write_file(tmp.path(), "t.csv", text.as_bytes());
    let val_rows = |seed: u64, out: &str| {
        let mut opts = options(
            csv_input(&csv, LabelColumn::Last, None),
            &tmp.path().join(out),
        );
        opts.val_fraction = 0.2;
        opts.seed = seed;
        pack(&opts).unwrap();
        Dataset::load(&tmp.path().join(out).join("val")).unwrap().x
    };
    let a = val_rows(5, "a");
    assert_eq!(a.len(), 10);
    assert!(a.windows(2).all(|w| w[0] < w[1]), "val keeps input order");
    assert_eq!(a, val_rows(5, "b"));
    assert_ne!(a, val_rows(6, "c"));
}

#[test]
fn npy_inputs_round_trip() {
    use npyz::WriterBuilder;
    let tmp = tempfile::tempdir().unwrap();
    let features = tmp.path().join("x.npy");
    let labels = tmp.path().join("y.npy");
    let xs: Vec<f64> = vec![0.5, 1.0, -2.0, 3.25, 4.0, 5.0];
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&[3, 2])
        .writer(std::fs::File::create(&features).unwrap())
        .begin_nd()
        .unwrap();
    w.extend(xs.iter().copied()).unwrap();
    w.finish().unwrap();
    npyz::to_file_1d(&labels, [2u8, 0, 1]).unwrap();

    let out = tmp.path().join("out");
    let input = PackInput::Npy {
        features: features.clone(),
        labels: labels.clone(),
    };
    let report = pack(&options(input, &out)).unwrap();
    assert_eq!((report.features, report.labels), (2, LabelKind::Classes(3)));
    let ds = Dataset::load(&out.join("train")).unwrap();
    assert_eq!(ds.x, [0.5, 1.0, -2.0, 3.25, 4.0, 5.0]);
    assert_eq!(ds.y, Labels::Classes(vec![2, 0, 1]));

    // Two labels for three rows.
    npyz::to_file_1d(&labels, [1i64, 0]).unwrap();
    let input = PackInput::Npy {
        features: features.clone(),
        labels: labels.clone(),
    };
    let err = pack(&options(input, &tmp.path().join("o2"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} has 3 rows but {} has 2 labels",
            features.display(),
            labels.display()
        )
    );

    // Float labels and 1-D features are refused, naming the file.
    npyz::to_file_1d(&labels, [1.0f32, 0.0, 1.0]).unwrap();
    let input = PackInput::Npy {
        features: features.clone(),
        labels: labels.clone(),
    };
    let err = pack(&options(input, &tmp.path().join("o3"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}: labels must be integers, found <f4", labels.display())
    );
    npyz::to_file_1d(&features, [1.0f32, 0.0, 1.0]).unwrap();
    let input = PackInput::Npy {
        features: features.clone(),
        labels,
    };
    let err = pack(&options(input, &tmp.path().join("o4"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: features must be a 2-D array, found shape [3]",
            features.display()
        )
    );
}

fn write_opts(shard_samples: usize) -> WriteOptions {
    WriteOptions {
        image: None,
        name: "rt".into(),
        features: 2,
        labels: LabelKind::Classes(4),
        shard_samples,
        standardization: None,
        source: Some("test".into()),
        tokenizer: None,
    }
}

fn sample_data(n: usize) -> (Vec<f32>, Vec<i64>) {
    let x = (0..2 * n).map(|i| i as f32 * 0.25 - 3.0).collect();
    let y = (0..n).map(|i| (i % 4) as i64).collect();
    (x, y)
}

#[test]
fn write_then_load_round_trips_across_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let (x, y) = sample_data(10);
    let written = write_dataset(&dir, &write_opts(3), &x, LabelRows::Classes(&y)).unwrap();
    let counts: Vec<u64> = written.shards.iter().map(|s| s.samples).collect();
    assert_eq!(counts, [3, 3, 3, 1]);
    assert_eq!(written.shards[3].file, "shard-00003.safetensors");

    let ds = Dataset::load(&dir).unwrap();
    assert_eq!(ds.manifest, written);
    assert_eq!(DatasetManifest::read(&dir).unwrap(), written);
    assert_eq!((ds.x, ds.y), (x.clone(), Labels::Classes(y.clone())));

    // No temporary files are left behind.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 5);
    assert_eq!(names[0], "MANIFEST.json");

    let again = write_dataset(&dir, &write_opts(3), &x, LabelRows::Classes(&y)).unwrap_err();
    assert!(matches!(again, DatasetError::OutputExists { .. }));
}

#[test]
fn write_refuses_inconsistent_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let (x, mut y) = sample_data(4);
    let err = write_dataset(&dir, &write_opts(3), &x[..7], LabelRows::Classes(&y)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "7 feature values do not form 4 samples of 2 features"
    );
    y[2] = 4;
    let err = write_dataset(&dir, &write_opts(3), &x, LabelRows::Classes(&y)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid input: sample 2 has label 4, outside 0..4"
    );
    assert!(!dir.exists(), "nothing is written for refused input");
}

#[test]
fn bit_flipped_shard_fails_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let (x, y) = sample_data(10);
    let manifest = write_dataset(&dir, &write_opts(4), &x, LabelRows::Classes(&y)).unwrap();
    let shard = dir.join("shard-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let actual = hex::encode(sha2::Sha256::digest(&bytes));

    let err = Dataset::load(&dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "shard {}: sha256 is {actual} but the manifest records {}",
            shard.display(),
            manifest.shards[1].sha256
        )
    );
}

/// Rewrites the manifest in `dir` through `edit` on its JSON.
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("MANIFEST.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[track_caller]
fn check_manifest_error(edit: impl FnOnce(&mut serde_json::Value), expected: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let (x, y) = sample_data(6);
    write_dataset(&dir, &write_opts(3), &x, LabelRows::Classes(&y)).unwrap();
    edit_manifest(&dir, edit);
    let err = DatasetManifest::read(&dir).unwrap_err().to_string();
    assert!(
        err.contains(expected),
        "{err:?} does not contain {expected:?}"
    );
    assert_eq!(Dataset::load(&dir).unwrap_err().to_string(), err);
}

#[test]
fn unsafe_or_inconsistent_manifests_are_rejected() {
    check_manifest_error(
        |v| v["shards"][0]["file"] = "../x".into(),
        "shard file name `../x` must be a plain file name",
    );
    check_manifest_error(
        |v| v["shards"][0]["file"] = "/etc/passwd".into(),
        "shard file name `/etc/passwd` must be a plain file name",
    );
    check_manifest_error(
        |v| v["num_samples"] = 7.into(),
        "shard sample counts sum to 6 but the manifest declares 7 samples",
    );
    check_manifest_error(
        |v| v["format_version"] = 2.into(),
        "unsupported dataset format version 2",
    );
    check_manifest_error(|v| v["extra"] = 1.into(), "unknown field `extra`");
    check_manifest_error(
        |v| v["schema"]["num_classes"] = 1.into(),
        "num_classes must be at least 2, found 1",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["shape"] = serde_json::json!([0]),
        "samples must have at least one feature",
    );
    check_manifest_error(
        |v| v["schema"]["features"]["shape"] = serde_json::json!([2_000_000]),
        "features per sample is 2000000, above the limit of 1048576",
    );
    check_manifest_error(
        |v| v["shards"][1]["file"] = "shard-00000.safetensors".into(),
        "shard `shard-00000.safetensors` is listed twice",
    );
}

/// Replaces shard 0 of the dataset in `dir` with `tensors` and records its
/// hash, so only the content checks can object.
fn replace_shard(dir: &Path, tensors: Vec<(&str, safetensors::tensor::TensorView<'_>)>) {
    let bytes = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(dir.join("shard-00000.safetensors"), &bytes).unwrap();
    let hash = hex::encode(sha2::Sha256::digest(&bytes));
    edit_manifest(dir, |v| v["shards"][0]["sha256"] = hash.into());
}

#[test]
fn shard_contents_are_checked_against_the_schema() {
    use safetensors::tensor::{Dtype, TensorView};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ds");
    let (x, y) = sample_data(4);
    write_dataset(&dir, &write_opts(2), &x, LabelRows::Classes(&y)).unwrap();
    let shard0 = dir.join("shard-00000.safetensors");
    let xb: Vec<u8> = [0.0f32, 1.0, 2.0, 3.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();

    let yb: Vec<u8> = [1i64, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
    replace_shard(
        &dir,
        vec![
            ("x", TensorView::new(Dtype::F32, vec![2, 2], &xb).unwrap()),
            ("y", TensorView::new(Dtype::I64, vec![2], &yb).unwrap()),
        ],
    );
    assert_eq!(
        Dataset::load(&dir).unwrap_err().to_string(),
        format!(
            "shard {}: sample 1 has label 9, outside 0..4",
            shard0.display()
        )
    );

    let y32: Vec<u8> = [1i32, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    replace_shard(
        &dir,
        vec![
            ("x", TensorView::new(Dtype::F32, vec![2, 2], &xb).unwrap()),
            ("y", TensorView::new(Dtype::I32, vec![2], &y32).unwrap()),
        ],
    );
    assert_eq!(
        Dataset::load(&dir).unwrap_err().to_string(),
        format!(
            "shard {}: tensor `y` is I32 [2], the schema requires I64 [2]",
            shard0.display()
        )
    );

    replace_shard(
        &dir,
        vec![("x", TensorView::new(Dtype::F32, vec![1, 4], &xb).unwrap())],
    );
    assert_eq!(
        Dataset::load(&dir).unwrap_err().to_string(),
        format!(
            "shard {}: tensor `x` is F32 [1, 4], the schema requires F32 [2, 2]",
            shard0.display()
        )
    );
}

#[test]
fn synthetic_data_is_deterministic_and_learnable() {
    let tmp = tempfile::tempdir().unwrap();
    let synth = |seed: u64, out: &str| {
        let opts = SynthOptions {
            output: tmp.path().join(out),
            name: "synth".into(),
            samples: 2000,
            features: 8,
            classes: 4,
            seed,
            shard_samples: 512,
        };
        let manifest = synthesize(&opts).unwrap();
        assert_eq!(manifest.shards.len(), 4);
        Dataset::load(&opts.output).unwrap()
    };
    let a = synth(3, "a");
    assert_eq!((a.x.clone(), a.y.clone()), {
        let b = synth(3, "b");
        (b.x, b.y)
    });
    assert_ne!(a.x, synth(4, "c").x);

    // Every class appears, and a nearest-class-mean rule fitted on the first
    // half classifies most of the second half: there is signal to learn.
    let (d, k) = (8, 4);
    let mut means = vec![0f64; k * d];
    let mut counts = vec![0usize; k];
    for i in 0..1000 {
        let (row, LabelRows::Classes(&[label])) = a.sample(i).unwrap() else {
            panic!("sample {i} is not one class label");
        };
        counts[label as usize] += 1;
        for j in 0..d {
            means[label as usize * d + j] += f64::from(row[j]);
        }
    }
    assert!(counts.iter().all(|&c| c > 150), "class counts {counts:?}");
    for c in 0..k {
        for j in 0..d {
            means[c * d + j] /= counts[c] as f64;
        }
    }
    let correct = (1000..2000)
        .filter(|&i| {
            let (row, LabelRows::Classes(&[label])) = a.sample(i).unwrap() else {
                panic!("sample {i} is not one class label");
            };
            let dist = |c: usize| -> f64 {
                (0..d)
                    .map(|j| (f64::from(row[j]) - means[c * d + j]).powi(2))
                    .sum()
            };
            let best = (0..k).min_by(|&p, &q| dist(p).total_cmp(&dist(q))).unwrap();
            best as i64 == label
        })
        .count();
    assert!(correct > 700, "nearest-mean accuracy {correct}/1000");
}
