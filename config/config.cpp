// see config.h
