//! `[task] kind = "language_model"` and `model.kind = "transformer"` in `job.toml`, seen from a
//! user: the keys and their defaults, the one-line `file:line:col` error for a key that does
//! not apply, a missing key or a bad value, and `val_perplexity` ranked lowest-first.

use std::path::Path;

use ringmaster_common::jobspec::{
    JobSpec, MetricMode, ModelSpec, TaskSpec, TransformerSpec, metric_direction,
};

/// A valid language-model job; the `[model]` table is on lines 5 to 10.
const BASE: &str = r#"name = "gpt"
seed = 1
[task]
kind = "language_model"
[model]
kind = "transformer"
layers = 2
heads = 4
width = 128
context = 64
[data]
train = "data/train"
validation = "data/val"
[train]
batch_size = 12
steps = 10
optimizer = "adam"
learning_rate = 0.001
eval_every_steps = 5
[workers]
min = 1
[output]
dir = "out"
"#;

const JOB: &str = "/jobs/team/job.toml";

#[track_caller]
fn check_err(source: &str, expected: &str) {
    match JobSpec::from_toml(source, Path::new(JOB)) {
        Ok(_) => panic!("expected {expected:?}, the job was accepted"),
        Err(e) => assert_eq!(e.to_string(), expected),
    }
}

#[test]
fn a_transformer_language_model_with_its_defaults() {
    let spec = JobSpec::from_toml(BASE, Path::new(JOB)).unwrap();
    assert_eq!(spec.check(), Ok(()));
    assert_eq!(spec.task, TaskSpec::LanguageModel);
    assert_eq!(spec.task.scores(), ["val_perplexity"]);
    assert_eq!(
        spec.model,
        ModelSpec::Transformer(TransformerSpec {
            layers: 2,
            heads: 4,
            width: 128,
            context: 64,
            dropout: 0.0,
            tied_embeddings: true,
        })
    );
    let untied = BASE.replace(
        "context = 64\n",
        "context = 64\ndropout = 0.1\ntied_embeddings = false\n",
    );
    let spec = JobSpec::from_toml(&untied, Path::new(JOB)).unwrap();
    let ModelSpec::Transformer(t) = spec.model else {
        panic!("not a transformer")
    };
    assert_eq!((t.dropout, t.tied_embeddings), (0.1, false));
    assert_eq!(metric_direction("val_perplexity"), Some(MetricMode::Min));
}

#[test]
fn bad_transformer_keys_are_located() {
    check_err(
        &BASE.replace("width = 128", "width = 130"),
        "/jobs/team/job.toml:9:9: model.width (130) must be divisible by model.heads (4)",
    );
    check_err(
        &BASE.replace("context = 64\n", ""),
        "/jobs/team/job.toml:6:8: model.kind = \"transformer\" needs model.context (e.g. 64, \
         the dataset's --context)",
    );
    check_err(
        &BASE.replace("layers = 2", "layers = 0"),
        "/jobs/team/job.toml:7:10: model.layers must be between 1 and 64, got 0",
    );
    check_err(
        &BASE.replace("layers = 2", "hidden = [16]"),
        "/jobs/team/job.toml:7:10: model.hidden does not apply to model.kind = \"transformer\"",
    );
    check_err(
        &BASE.replace(
            "kind = \"transformer\"\nlayers = 2",
            "kind = \"mlp\"\nhidden = [8]",
        ),
        "/jobs/team/job.toml:8:9: model.heads does not apply to model.kind = \"mlp\"",
    );
}

#[test]
fn language_model_keys_and_metrics() {
    check_err(
        &BASE.replace(
            "kind = \"language_model\"",
            "kind = \"language_model\"\nloss = \"mse\"",
        ),
        "/jobs/team/job.toml:5:8: task.loss does not apply to task.kind = \"language_model\" \
         (its loss is next-token cross entropy)",
    );
    let early = |metric: &str, mode: &str| {
        BASE.replace(
            "eval_every_steps = 5\n",
            &format!(
                "eval_every_steps = 5\nearly_stopping = {{ metric = \"{metric}\", mode = \
                 \"{mode}\", patience = 2 }}\n"
            ),
        )
    };
    let spec = JobSpec::from_toml(&early("val_perplexity", "min"), Path::new(JOB)).unwrap();
    assert_eq!(spec.check(), Ok(()));
    let err = JobSpec::from_toml(&early("val_accuracy", "max"), Path::new(JOB))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"val_accuracy\" is not reported for task.kind = \"language_model\""),
        "{err}"
    );
    let err = JobSpec::from_toml(&early("val_perplexity", "max"), Path::new(JOB))
        .unwrap_err()
        .to_string();
    assert!(err.contains("val_perplexity"), "{err}");
}

/// The shipped `examples/text-gpt.toml` parses into a transformer language model whose context
/// is the one its pack command uses, and survives the JSON form the coordinator stores.
#[test]
fn the_text_example_parses_and_round_trips() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/text-gpt.toml");
    let source = std::fs::read_to_string(&path).unwrap();
    assert!(
        source.contains("--context 64"),
        "the pack command in its comment"
    );
    let spec = JobSpec::from_toml(&source, &path).unwrap();
    assert_eq!(spec.task, TaskSpec::LanguageModel);
    let ModelSpec::Transformer(t) = &spec.model else {
        panic!("not a transformer: {:?}", spec.model)
    };
    assert_eq!((t.layers, t.heads, t.width, t.context), (2, 4, 128, 64));
    assert!(t.tied_embeddings && t.dropout > 0.0);
    let back: JobSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.check(), Ok(()));
}
