//! The library's error type: every fallible kernel returns `Result<T, Error>`, and the Python
//! layer maps each kind onto the matching Python exception.

use std::fmt;

/// What went wrong, classified the way Python callers expect it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A value is out of range or inconsistent with another (`ValueError`).
    Value(String),
    /// An argument has the wrong kind, dtype or layout (`TypeError`).
    Type(String),
    /// The operation failed for a reason outside the caller's arguments (`RuntimeError`).
    Runtime(String),
    /// Reading or writing a file failed (`OSError`).
    Io(String),
}

impl Error {
    pub fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub fn type_(msg: impl Into<String>) -> Self {
        Error::Type(msg.into())
    }
    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value(m) | Error::Type(m) | Error::Runtime(m) | Error::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `dims[0] * dims[1] * ...`, or a `ValueError` that names `what` and the factors when the product
/// does not fit in `usize`. Every size product computed from caller-controlled numbers goes
/// through it (or [`checked_mul`]), so no size wraps around in release builds.
pub fn checked_product(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            let factors: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            Error::value(format!(
                "{what} = {} overflows a 64-bit size",
                factors.join(" x ")
            ))
        })
}

/// `a * b` as [`checked_product`].
pub fn checked_mul(what: &str, a: usize, b: usize) -> Result<usize> {
    checked_product(what, &[a, b])
}

/// Element types whose all-zero bit pattern is the value 0, so a zeroed allocation is a valid
/// vector of zeros.
///
/// # Safety
/// Implement only for types where every all-zero byte pattern is a valid value.
pub unsafe trait ZeroBits: Copy {}

macro_rules! zero_bits {
    ($($t:ty),*) => { $(unsafe impl ZeroBits for $t {})* };
}
zero_bits!(
    u8,
    i8,
    u16,
    i16,
    u32,
    i32,
    u64,
    i64,
    usize,
    isize,
    f32,
    f64,
    half::bf16
);

fn alloc_error<T>(what: &str, n: usize) -> Error {
    match n.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Error::runtime(format!(
            "out of memory: could not allocate {bytes} bytes for {what} ({n} elements)"
        )),
        _ => Error::value(format!(
            "{what} would need {n} elements of {} bytes, more than the address space",
            std::mem::size_of::<T>()
        )),
    }
}

/// An empty vector with room for `n` elements: a `RuntimeError` instead of an abort when the
/// allocation fails (a `ValueError` when `n` elements cannot exist at all).
pub fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| alloc_error::<T>(what, n))?;
    Ok(v)
}

/// `vec![value; n]`, failing as [`try_with_capacity`] does.
pub fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// `vec![0; n]` (a zeroed allocation, like `vec!`: large ones cost no write pass), failing as
/// [`try_with_capacity`] does.
pub fn try_zeroed<T: ZeroBits>(n: usize, what: &str) -> Result<Vec<T>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if std::mem::size_of::<T>() == 0 {
        // SAFETY: all-zero bits are a valid `T` (see `ZeroBits`).
        return try_filled(n, unsafe { std::mem::zeroed() }, what);
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| alloc_error::<T>(what, n))?;
    // SAFETY: the layout has a non-zero size (n > 0, T not zero-sized).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(alloc_error::<T>(what, n));
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `Vec<T>` of capacity `n`,
    // and all `n` elements are initialised (all-zero bits are a valid `T`, see `ZeroBits`).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_and_allocations_fail_cleanly() {
        assert_eq!(checked_product("x", &[2, 3, 4]).unwrap(), 24);
        assert_eq!(checked_product("x", &[0, usize::MAX, 7]).unwrap(), 0);
        assert!(matches!(
            checked_product("x", &[1 << 40, 1 << 40]),
            Err(Error::Value(_))
        ));
        assert!(matches!(
            try_zeroed::<f32>(usize::MAX / 2, "t"),
            Err(Error::Value(_))
        ));
        // 2^60 bytes fit the size type but no allocator hands them out.
        assert!(matches!(
            try_zeroed::<u8>(1 << 60, "t"),
            Err(Error::Runtime(_))
        ));
        assert!(matches!(
            try_filled(1usize << 59, 0u64, "t"),
            Err(Error::Runtime(_))
        ));
        assert_eq!(try_zeroed::<f64>(5, "t").unwrap(), vec![0.0; 5]);
        assert_eq!(try_zeroed::<i64>(0, "t").unwrap(), Vec::<i64>::new());
        assert_eq!(try_filled(3, 7i64, "t").unwrap(), vec![7, 7, 7]);
        assert!(try_with_capacity::<u16>(9, "t").unwrap().capacity() >= 9);
    }
}
