//! Log lines through the `log` facade with the `log` feature; without it,
//! nothing is formatted or evaluated beyond borrowing the arguments.

/// `cp_log!(level, ...)`: a line at `log::Level::level`, target "clusterphone".
macro_rules! cp_log {
    ($level:ident, $($arg:tt)+) => {{
        #[cfg(feature = "log")]
        {
            ::log::log!(target: "clusterphone", ::log::Level::$level, $($arg)+);
        }
        #[cfg(not(feature = "log"))]
        {
            let _ = format_args!($($arg)+);
        }
    }};
}
