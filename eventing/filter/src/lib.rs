//! Trigger filters: attributes exact match, the filters dialects and CESQL
