//! Knative Service YAML (serving.knative.dev/v1) for the end-to-end tests and the benches: one builder
//! instead of a `format!` in each file. It uses nothing but `serde_json`, so a bench can include this
//! file by path without depending on the whole harness.

/// A Knative Service in namespace `default` whose one container runs `command` (Sluice runs it as a
/// process; the image is only a name).
#[derive(Debug, Clone)]
pub struct KnativeService {
    name: String,
    image: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    annotations: Vec<(String, String)>,
    spec: String,
    container: String,
    traffic: String,
}

impl KnativeService {
    /// The image defaults to the Service's name.
    pub fn new(name: &str, command: &[&str]) -> Self {
        KnativeService {
            name: name.to_string(),
            image: name.to_string(),
            command: command.iter().map(|c| c.to_string()).collect(),
            env: Vec::new(),
            annotations: Vec::new(),
            spec: String::new(),
            container: String::new(),
            traffic: String::new(),
        }
    }

    pub fn image(mut self, image: &str) -> Self {
        self.image = image.to_string();
        self
    }

    /// Sets an environment variable of the container (replacing one of the same name: a template
    /// change makes a new Revision).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        match self.env.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = value.to_string(),
            None => self.env.push((name.to_string(), value.to_string())),
        }
        self
    }

    /// An annotation of the Revision template (`autoscaling.knative.dev/...`).
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_string(), value.to_string()));
        self
    }

    /// Extra YAML under `spec.template.spec`, indented by 6 (`containerConcurrency`, `timeoutSeconds`).
    pub fn spec(mut self, yaml: &str) -> Self {
        self.spec = yaml.to_string();
        self
    }

    /// Extra YAML under the container, indented by 8 (probes, ports).
    pub fn container(mut self, yaml: &str) -> Self {
        self.container = yaml.to_string();
        self
    }

    /// The whole `spec.traffic` list, indented by 2.
    pub fn traffic(mut self, yaml: &str) -> Self {
        self.traffic = yaml.to_string();
        self
    }

    pub fn yaml(&self) -> String {
        let quote = |s: &str| serde_json::to_string(s).expect("a JSON string");
        let mut out = format!(
            "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: default\nspec:\n  template:\n",
            self.name
        );
        if !self.annotations.is_empty() {
            out.push_str("    metadata:\n      annotations:\n");
            for (k, v) in &self.annotations {
                out.push_str(&format!("        {k}: {}\n", quote(v)));
            }
        }
        out.push_str("    spec:\n");
        out.push_str(&self.spec);
        out.push_str(&format!(
            "      containers:\n      - image: {}\n        command: {}\n",
            self.image,
            serde_json::to_string(&self.command).expect("a JSON array")
        ));
        if !self.env.is_empty() {
            out.push_str("        env:\n");
            for (name, value) in &self.env {
                out.push_str(&format!(
                    "        - name: {name}\n          value: {}\n",
                    quote(value)
                ));
            }
        }
        out.push_str(&self.container);
        if !self.traffic.is_empty() {
            out.push_str(&format!("  traffic:\n{}\n", self.traffic));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_with_everything_is_the_yaml_knative_reads() {
        let yaml = KnativeService::new("web", &["/bin/app", "--port", "8080"])
            .image("app")
            .env("APP_VERSION", "1")
            .env("APP_VERSION", "2")
            .annotation("autoscaling.knative.dev/min-scale", "1")
            .spec("      containerConcurrency: 1\n")
            .container(
                "        readinessProbe:\n          exec:\n            command: [\"true\"]\n",
            )
            .traffic("  - latestRevision: true\n    percent: 100")
            .yaml();
        assert_eq!(
            yaml,
            "apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  template:
    metadata:
      annotations:
        autoscaling.knative.dev/min-scale: \"1\"
    spec:
      containerConcurrency: 1
      containers:
      - image: app
        command: [\"/bin/app\",\"--port\",\"8080\"]
        env:
        - name: APP_VERSION
          value: \"2\"
        readinessProbe:
          exec:
            command: [\"true\"]
  traffic:
  - latestRevision: true
    percent: 100
"
        );
    }

    #[test]
    fn a_plain_service_has_no_empty_sections() {
        let yaml = KnativeService::new("web", &["/bin/app"]).yaml();
        assert!(yaml.ends_with(
            "    spec:\n      containers:\n      - image: web\n        command: [\"/bin/app\"]\n"
        ));
        assert!(
            !yaml.contains("annotations") && !yaml.contains("env") && !yaml.contains("traffic")
        );
    }
}
