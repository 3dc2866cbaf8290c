// Boost.Asio and Boost.Beast compiled once for the whole program (separate compilation), so
// translation units that include them do not each instantiate the implementations.
#include <boost/asio/impl/src.hpp>
#include <boost/beast/src.hpp>
