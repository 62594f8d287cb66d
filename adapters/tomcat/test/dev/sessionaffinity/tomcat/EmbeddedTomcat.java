package dev.sessionaffinity.tomcat;

import java.io.File;
import java.io.IOException;
import java.nio.file.Files;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Consumer;

import jakarta.servlet.ServletException;
import jakarta.servlet.http.HttpServlet;
import jakarta.servlet.http.HttpServletRequest;
import jakarta.servlet.http.HttpServletResponse;
import jakarta.servlet.http.HttpSessionEvent;
import jakarta.servlet.http.HttpSessionListener;

import org.apache.catalina.Context;
import org.apache.catalina.LifecycleException;
import org.apache.catalina.Wrapper;
import org.apache.catalina.authenticator.BasicAuthenticator;
import org.apache.catalina.servlets.DefaultServlet;
import org.apache.catalina.connector.Connector;
import org.apache.catalina.startup.Tomcat;
import org.apache.tomcat.util.descriptor.web.LoginConfig;
import org.apache.tomcat.util.descriptor.web.SecurityCollection;
import org.apache.tomcat.util.descriptor.web.SecurityConstraint;

import dev.sessionaffinity.demo.ApiServlet;

/**
 * A real Tomcat in the test's JVM on a free loopback port: the valve in the
 * ROOT context's pipeline, the demo app's servlet behind it, and a count of
 * the requests that reached the app. Tomcat's DefaultServlet serves the files
 * under {@code /files/} (big ones through sendfile).
 */
final class EmbeddedTomcat implements AutoCloseable {

    static final String DEMO_CLASSES = "dev\\.sessionaffinity\\.demo\\..*";
    static final String PASSWORD = "test-password-of-ann";
    private static final AtomicInteger ENGINES = new AtomicInteger();

    final SessionAffinityValve valve = new SessionAffinityValve();
    final AtomicInteger appInvocations = new AtomicInteger();
    /** sessionDestroyed events. */
    final AtomicInteger sessionsDestroyed = new AtomicInteger();
    /** A request with a {@code hold} parameter counts this down on entering the app, then waits for release. */
    volatile CountDownLatch entered = new CountDownLatch(1);
    volatile CountDownLatch release = new CountDownLatch(0);
    final Context context;
    private final Tomcat tomcat = new Tomcat();
    private final Connector connector = new Connector("HTTP/1.1");
    private final File base;

    EmbeddedTomcat(File keyFile, Consumer<SessionAffinityValve> configure, Map<String, String> connectorProperties)
            throws IOException, LifecycleException {
        this(keyFile, configure, connectorProperties, false);
    }

    /** basicAuth: POST /cart/add needs user ann (password {@value #PASSWORD}) by BASIC authentication. */
    @SuppressWarnings("deprecation") // addServletMappingDecoded: what Tomcat's own embedded examples use
    EmbeddedTomcat(File keyFile, Consumer<SessionAffinityValve> configure, Map<String, String> connectorProperties,
            boolean basicAuth) throws IOException, LifecycleException {
        base = Files.createTempDirectory("valve-test").toFile();
        tomcat.setBaseDir(base.getPath());
        tomcat.getEngine().setName("test" + ENGINES.incrementAndGet()); // own JMX domain per Tomcat
        connector.setPort(0);
        connector.setProperty("address", "127.0.0.1");
        connectorProperties.forEach(connector::setProperty);
        tomcat.getService().addConnector(connector);
        tomcat.setConnector(connector);
        context = tomcat.addContext("", base.getPath());
        valve.setKeyFile(keyFile.getPath());
        valve.setAllowedClasses(DEMO_CLASSES);
        configure.accept(valve);
        context.getPipeline().addValve(valve);
        if (basicAuth) {
            tomcat.addUser("ann", PASSWORD);
            tomcat.addRole("ann", "shopper");
            LoginConfig login = new LoginConfig();
            login.setAuthMethod("BASIC");
            context.setLoginConfig(login);
            SecurityCollection paths = new SecurityCollection();
            paths.addPattern("/cart/add");
            SecurityConstraint constraint = new SecurityConstraint();
            constraint.addAuthRole("shopper");
            constraint.addCollection(paths);
            context.addConstraint(constraint);
            context.getPipeline().addValve(new BasicAuthenticator()); // after the valve, as ContextConfig adds it
        }
        ApiServlet app = new ApiServlet();
        Wrapper wrapper = Tomcat.addServlet(context, "app", new HttpServlet() {
            private static final long serialVersionUID = 1L;

            @Override
            protected void service(HttpServletRequest request, HttpServletResponse response) throws ServletException, IOException {
                appInvocations.incrementAndGet();
                if (request.getParameter("hold") != null) {
                    entered.countDown();
                    try {
                        release.await(10, TimeUnit.SECONDS);
                    } catch (InterruptedException e) {
                        Thread.currentThread().interrupt();
                    }
                }
                app.service(request, response);
            }
        });
        wrapper.setAsyncSupported(true);

        context.addServletMappingDecoded("/", "app");
        Tomcat.addServlet(context, "files", new DefaultServlet());
        context.addServletMappingDecoded("/files/*", "files");
        tomcat.start();
        // After the start, which sets the context's lifecycle listeners from its configuration.
        context.setApplicationLifecycleListeners(new Object[] {new HttpSessionListener() {
            @Override
            public void sessionDestroyed(HttpSessionEvent event) {
                sessionsDestroyed.incrementAndGet();
            }
        }});
    }

    /** A file the DefaultServlet serves at /files/name. */
    void addFile(String name, byte[] content) throws IOException {
        File files = new File(base, "files");
        files.mkdirs();
        Files.write(new File(files, name).toPath(), content);
    }

    int port() {
        return connector.getLocalPort();
    }

    RawHttp.Reply send(String method, String path, Map<String, String> headers) throws IOException {
        return RawHttp.send(port(), method, path, headers, "HTTP/1.1");
    }

    @Override
    public void close() throws LifecycleException {
        tomcat.stop();
        tomcat.destroy();
    }
}
