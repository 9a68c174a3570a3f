//! Knative YAML as a user writes it: any text. Reading never panics, every error names a document,
//! and every object read can be defaulted, validated and (for an Ingress) hashed as Sluice does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_api::Object;
use sluice_api::serving::Defaults;

fuzz_target!(|text: &str| {
    // read_documents catches serde_yaml's own panics (it turns them into an error); libfuzzer-sys's
    // hook would abort on them first. The default hook lets them unwind; a panic that escapes the
    // target still aborts (libfuzzer-sys catches it at the top and reports a crash).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let defaults = Defaults::default();
    for result in sluice_api::parse_documents(text) {
        let object = match result {
            Ok(object) => object,
            Err(error) => {
                assert!(error.document >= 1, "documents count from 1");
                let _ = error.to_string();
                continue;
            }
        };
        let _ = object.kind();
        let _ = object.metadata();
        match object {
            Object::KnativeService(mut service) => {
                let _ = service.validate(&defaults);
                service.set_defaults(&defaults);
            }
            Object::Configuration(mut configuration) => {
                let _ = configuration.validate(&defaults);
                configuration.set_defaults(&defaults);
            }
            Object::Route(mut route) => {
                let _ = route.validate();
                route.set_defaults();
            }
            Object::Ingress(mut ingress) => {
                let hash = sluice_api::probe::insert_probe(&mut ingress);
                assert!(!hash.is_empty());
            }
            _ => {}
        }
    }
});
