//! Near-duplicate detection: normalisation and shingling, MinHash signatures, LSH banding,
//! candidate verification and clustering.
