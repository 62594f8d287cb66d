package dev.sessionaffinity.embedded;

import java.io.File;
import java.nio.file.Files;

import org.apache.catalina.Context;
import org.apache.catalina.Wrapper;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.session.StandardManager;
import org.apache.catalina.startup.Tomcat;
import org.apache.tomcat.util.IntrospectionUtils;

import dev.sessionaffinity.demo.ApiServlet;
import dev.sessionaffinity.demo.PageServlet;
import dev.sessionaffinity.tomcat.SessionAffinityValve;

/**
 * The demo app on an embedded Tomcat (org.apache.catalina.startup.Tomcat, what
 * Spring Boot runs), with the valve added in code the way Spring Boot's
 * {@code TomcatServletWebServerFactory.addContextValves} does:
 *
 * <pre>
 * java -cp ... dev.sessionaffinity.embedded.Main PORT [valveAttribute=value ...]
 * </pre>
 *
 * <p>Listens on 127.0.0.1 only; the signing key comes from the environment
 * (SESSION_STATE_KEYS) as for any Tomcat.
 */
public final class Main {

    private Main() {
    }

    @SuppressWarnings("deprecation") // addServletMappingDecoded: what Tomcat's own embedded examples use
    public static void main(String[] args) throws Exception {
        Tomcat tomcat = new Tomcat();
        File base = Files.createTempDirectory("embedded-tomcat").toFile();
        tomcat.setBaseDir(base.getPath());
        Connector connector = new Connector("HTTP/1.1");
        connector.setPort(Integer.parseInt(args[0]));
        connector.setProperty("address", "127.0.0.1");
        tomcat.getService().addConnector(connector);
        tomcat.setConnector(connector);

        Context context = tomcat.addContext("", base.getPath());
        StandardManager manager = new StandardManager();
        manager.setPathname(null); // sessions live in memory only, as in a pod
        context.setManager(manager);
        SessionAffinityValve valve = new SessionAffinityValve();
        for (int i = 1; i < args.length; i++) {
            String[] attribute = args[i].split("=", 2);
            if (attribute.length != 2 || !IntrospectionUtils.setProperty(valve, attribute[0], attribute[1])) {
                throw new IllegalArgumentException("not a valve attribute: " + args[i]);
            }
        }
        context.getPipeline().addValve(valve);

        Wrapper api = Tomcat.addServlet(context, "api", new ApiServlet());
        api.setAsyncSupported(true);
        context.addServletMappingDecoded("/", "api"); // the API answers 404 for paths it does not know
        Tomcat.addServlet(context, "page", new PageServlet());
        context.addServletMappingDecoded("/shop", "page");
        context.setSessionTimeout(30);

        tomcat.getServer().setPort(-1); // no shutdown port: stopped by signal, like a pod
        tomcat.start();
        tomcat.getServer().await();
    }
}
